//! Who asked (ADR 0014), against the real stack: a nats-server enforcing usbpt's nkey
//! identities, `usbpt serve` with its own identities and an API token, the admin identity
//! sending commands over NATS as the CLI does, an HTTP client with the token.
//!
//! - a boot over HTTP and a delete over NATS record different origins on every event they
//!   append: HTTP with the token identity, the TCP peer, the User-Agent and the request id the
//!   client sent (and was answered with); NATS with the admin identity's public key;
//! - an agent's event stays a version-1 envelope without an origin;
//! - the custody ledger (JSON and the CLI's CSV) shows the interval `started_by` the HTTP boot
//!   and `ended_by` the NATS delete.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../schemas/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command as Proc};
use usbpt_bus::auth::{CredsDir, Role};
use usbpt_bus::{Bus, StartAt};
use usbpt_commands::handler::request;
use usbpt_schemas::commands::{Command, CommandReply};
use usbpt_schemas::*;
use usbpt_testkit::TestNats;

const TOKEN: &str = "origin-test-token-5f0c2a9d1e7b4c3a";
const REQUEST_ID: &str = "req-0190a000-0000-7000-8000-0000000000aa";
const AGENT: &str = "origin-test/1.0";

fn lineage() -> LineageId {
    LineageId::derive(&LineageKey::Serial {
        vendor: VendorId(0x136b),
        product: ProductId(0x0003),
        serial: "ORIGIN-1",
    })
}

/// What an agent on host-a would publish: it started, and one key is plugged in.
async fn seed(admin: &Bus) -> Result<()> {
    admin
        .publish(&Envelope::new(Event::HostAgentStarted(HostAgentStarted {
            host: common::host("host-a"),
            boot_id: "boot-1".into(),
            agent_version: "test".into(),
            hypervisor_uri: "test:///default".into(),
        })))
        .await?;
    let Event::DeviceDiscovered(mut d) = common::sample_bodies().remove(1) else {
        unreachable!()
    };
    d.device_id = DeviceId::new_v7();
    d.host = common::host("host-a");
    d.lineage_kind = LineageKind::Serial;
    d.descriptors.vendor_id = VendorId(0x136b);
    d.descriptors.product_id = ProductId(0x0003);
    d.descriptors.serial = Some("ORIGIN-1".into());
    d.supersedes = None;
    d.lineage_id = lineage();
    admin
        .publish(&Envelope::new(Event::DeviceDiscovered(d)))
        .await?;
    Ok(())
}

struct Serve {
    _child: Child,
    api: String,
}

async fn serve(nats: &TestNats, creds: &CredsDir, data: &Path) -> Result<Serve> {
    let token = data.join("token");
    std::fs::write(&token, format!("{TOKEN}\n"))?;
    let mut child = Proc::new(env!("CARGO_BIN_EXE_usbpt"))
        .arg("serve")
        .args(["--listen", "127.0.0.1:0"])
        .arg("--creds")
        .arg(creds.path(&Role::Projector))
        .arg("--command-creds")
        .arg(creds.path(&Role::Commands))
        .arg("--api-token-file")
        .arg(&token)
        .env("NATS_URL", nats.url())
        .env("USBPT_DATA_DIR", data)
        .env("USBPT_LOG", "warn")
        .env_remove("USBPT_INSECURE")
        .env_remove("USBPT_API_TOKEN")
        .env_remove("USBPT_API_TOKEN_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawn usbpt serve")?;
    let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
    let api = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            eprintln!("[serve] {line}");
            if let Some(url) = line.split("listening on ").nth(1) {
                return Ok(url.trim().to_owned());
            }
        }
        bail!("usbpt serve exited before listening")
    })
    .await
    .context("usbpt serve did not announce its address")??;
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[serve] {line}");
        }
    });
    Ok(Serve { _child: child, api })
}

/// An HTTP request with the token, a User-Agent and a request id; (status, headers, JSON).
async fn call(
    serve: &Serve,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, reqwest::header::HeaderMap, Value)> {
    let mut req = reqwest::Client::new()
        .request(method, format!("{}{path}", serve.api))
        .bearer_auth(TOKEN)
        .header(reqwest::header::USER_AGENT, AGENT)
        .header("x-openstack-request-id", REQUEST_ID)
        .timeout(Duration::from_secs(30));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await?;
    let json = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).with_context(|| format!("not JSON: {text}"))?
    };
    Ok((status, headers, json))
}

/// Every stored event up to `head`: (kind, origin, schema version).
async fn history(bus: &Bus, head: u64) -> Result<Vec<(String, Option<Origin>, u16)>> {
    let mut reader = bus.reader(StartAt::Beginning, None).await?;
    let mut out = Vec::new();
    loop {
        let msg = reader.next().await?;
        let env = msg.decode()?;
        out.push((env.body.kind().to_owned(), env.origin, env.schema_version));
        if msg.seq >= head {
            return Ok(out);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_and_nats_commands_record_who_asked_and_custody_shows_it() -> Result<()> {
    let (nats, creds) = TestNats::start_secured(&["host-a"]).await?;
    let admin = nats.bus_as(&creds, &Role::Admin).await?;
    let admin_key = admin
        .public_key()
        .context("the admin identity has an nkey")?;
    let data = tempfile::tempdir()?;
    let serve = serve(&nats, &creds, data.path()).await?;
    seed(&admin).await?;

    // The command service answers over NATS once its subscription is in place: probe with a
    // command that is always refused (no such server).
    let probe = Command::Delete {
        name: ServerName::new("no-such-server")?,
    };
    usbpt_testkit::eventually(Duration::from_secs(30), || async {
        match request(&admin, &probe, Duration::from_secs(5)).await {
            Ok(CommandReply::Rejected { .. }) => Some(()),
            _ => None,
        }
    })
    .await?;

    // Over HTTP: a flavor asking for the key, and a server booted with it.
    let usb = json!([{"vendor_id": "136b", "product_id": "0003", "controller": "xhci"}]);
    let (code, _, doc) = call(
        &serve,
        reqwest::Method::POST,
        "/v2.1/flavors",
        Some(json!({"flavor": {"name": "keyed", "usb_devices": usb}})),
    )
    .await?;
    assert_eq!(code, 200, "{doc}");
    let (code, headers, doc) = call(
        &serve,
        reqwest::Method::POST,
        "/v2.1/servers",
        Some(json!({"server": {"name": "erp-1", "flavorRef": "keyed"}})),
    )
    .await?;
    assert_eq!(code, 202, "{doc}");
    assert_eq!(
        headers["x-openstack-request-id"], REQUEST_ID,
        "the client's request id is the one answered and recorded"
    );

    // Over NATS, as the CLI does with the admin identity: delete it.
    let reply = request(
        &admin,
        &Command::Delete {
            name: ServerName::new("erp-1")?,
        },
        Duration::from_secs(30),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    assert!(matches!(reply, CommandReply::Accepted { .. }), "{reply:?}");

    // The stream: every event of the HTTP commands carries the HTTP origin, every event of
    // the NATS command the admin's key; the agent's events are version 1, without one.
    let head = admin.last_sequence().await?;
    let events = history(&admin, head).await?;
    let http = |o: &Origin| {
        o.via() == Via::Http
            && o.principal() == "token"
            && o.address().is_some_and(|a| a.starts_with("127.0.0.1:"))
            && o.client() == Some(AGENT)
            && o.request_id() == Some(REQUEST_ID)
    };
    let by_admin = |o: &Origin| o.via() == Via::Nats && o.principal() == admin_key;
    let kinds: Vec<&str> = events.iter().map(|(k, _, _)| k.as_str()).collect();
    for (kind, origin, version) in &events {
        match kind.as_str() {
            "HostAgentStarted" | "DeviceDiscovered" => {
                assert_eq!((origin, *version), (&None, 1), "{kind}")
            }
            "FlavorCreated" | "ServerBootRequested" | "DeviceClaimed" | "ServerScheduled" => {
                assert!(origin.as_ref().is_some_and(http), "{kind}: {origin:?}");
                assert_eq!(*version, 2, "{kind}");
            }
            "ServerDeleted" | "DeviceReleased" => {
                assert!(origin.as_ref().is_some_and(by_admin), "{kind}: {origin:?}");
                assert_eq!(*version, 2, "{kind}");
            }
            // The refused probes appended nothing; anything else is a surprise.
            other => assert!(
                other == "FlavorUsbSet" || other == "FlavorSized",
                "unexpected {other}: {kinds:?}"
            ),
        }
    }
    for want in ["DeviceClaimed", "ServerScheduled", "DeviceReleased"] {
        assert!(kinds.contains(&want), "no {want} in {kinds:?}");
    }

    // The custody ledger: one interval, begun by the HTTP boot, ended by the NATS delete.
    let path = format!("/v1/lineages/{}/custody", lineage());
    let (code, _, doc) = call(&serve, reqwest::Method::GET, &path, None).await?;
    assert_eq!(code, 200, "{doc}");
    let intervals = doc["intervals"].as_array().context("intervals")?;
    assert_eq!(intervals.len(), 1, "{doc}");
    let i = &intervals[0];
    assert_eq!(i["started"], "boot", "{doc}");
    assert_eq!(i["ended"], "ServerDeleted", "{doc}");
    let started: Origin = serde_json::from_value(i["started_by"].clone())?;
    let ended: Origin = serde_json::from_value(i["ended_by"].clone())?;
    assert!(http(&started), "{started:?}");
    assert!(by_admin(&ended), "{ended:?}");

    // The CLI's CSV: who asked in the last two columns.
    let out = Proc::new(env!("CARGO_BIN_EXE_usbpt"))
        .args(["custody", &lineage().to_string(), "--csv"])
        .env("USBPT_API", &serve.api)
        .env("USBPT_API_TOKEN", TOKEN)
        .env("USBPT_DATA_DIR", data.path())
        .output()
        .await?;
    let csv = String::from_utf8(out.stdout)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<&str> = csv.lines().collect();
    assert!(rows[0].ends_with(",started_by,ended_by"), "{csv}");
    let row = rows.get(1).context("one row")?;
    assert!(
        row.ends_with(&format!(
            ",http:token@{},nats:{admin_key}",
            started.address().unwrap()
        )),
        "{csv}"
    );
    Ok(())
}
