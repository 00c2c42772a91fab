//! `usbpt replay` against a real nats-server: `--until` reproduces the world as the live view
//! showed it then; `--verify` passes for the live view and names the first difference of a
//! view that is not a clean fold of the stream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod projector_support;

use std::sync::Arc;

use anyhow::Result;
use projector_support::{usbpt, Serve};
use usbpt_bus::StartAt;
use usbpt_projector::workload::{publish_all, Workload};
use usbpt_projector::{BatchOptions, RawEvent, View};
use usbpt_schemas::{codec, Event};
use usbpt_testkit::TestNats;

#[tokio::test]
async fn until_reproduces_an_earlier_state_and_verify_checks_the_live_view() -> Result<()> {
    let nats = TestNats::start().await?;
    let bus = nats.bus().await?;
    let data = tempfile::tempdir()?;
    let serve = Serve::start(&nats.url(), data.path()).await?;
    let mut workload = Workload::new(42, 4, 4);

    let k = publish_all(&bus, workload.by_ref().take(400), 100).await?;
    serve.wait_applied(k).await?;
    let (_, devices_at_k) = serve.get("/v1/devices").await?;
    let (_, servers_at_k) = serve.get("/v2.1/servers/detail").await?;
    assert!(
        devices_at_k["devices"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["status"] == "attached"),
        "the story has attached devices by then"
    );

    let last = publish_all(&bus, workload.by_ref().take(600), 100).await?;
    serve.wait_applied(last).await?;
    let (_, devices_now) = serve.get("/v1/devices").await?;
    assert_ne!(devices_now, devices_at_k, "the world moved on");

    let then = serve
        .cli_json(&["replay", "--until", &k.to_string(), "--json"])
        .await?;
    assert_eq!(then["last_applied_seq"], k);
    assert_eq!(then["devices"], devices_at_k["devices"]);
    assert_eq!(then["servers"], servers_at_k["servers"]);

    let now = serve.cli_json(&["replay", "--json"]).await?;
    assert_eq!(now["last_applied_seq"], last);
    assert_eq!(now["devices"], devices_now["devices"]);

    let (ok, text, err) = serve.cli(&["replay", "--until", &k.to_string()]).await?;
    assert!(ok, "{err}");
    assert!(
        text.starts_with(&format!("replayed sequences 1..={k}:")),
        "{text}"
    );
    assert!(text.contains("attached"));

    // The live view (held open by the running server) equals a clean replay.
    let (ok, text, err) = serve.cli(&["replay", "--verify"]).await?;
    assert!(ok, "{err}");
    assert!(
        text.starts_with(&format!("verified: the live view at sequence {last}")),
        "{text}"
    );

    let (ok, _, err) = serve
        .cli(&["replay", "--until", &(last + 10).to_string()])
        .await?;
    assert!(!ok);
    assert!(err.contains(&format!("ends at sequence {last}")), "{err}");
    Ok(())
}

#[tokio::test]
async fn verify_names_the_first_key_where_a_view_differs_from_a_clean_replay() -> Result<()> {
    let nats = TestNats::start().await?;
    let bus = nats.bus().await?;
    let last = publish_all(&bus, Workload::new(9, 2, 3).take(200), 100).await?;

    // A "live" view folded from the stream with one event altered: host-00001's first device
    // reports another product name.
    let mut messages = bus.reader(StartAt::Beginning, None).await?;
    let mut events = Vec::new();
    let mut tampered = None;
    loop {
        let m = messages.next().await?;
        let seq = m.seq;
        let mut payload = m.payload.clone();
        let mut env = codec::decode(&payload)?;
        if let Event::DeviceDiscovered(d) = &mut env.body {
            if tampered.is_none() && d.host.as_str() == "host-00001" {
                d.descriptors.product = Some("tampered".into());
                tampered = Some(d.device_id);
                payload = codec::encode(&env)?.into();
            }
        }
        events.push(RawEvent {
            seq,
            subject: m.subject.to_string(),
            payload,
        });
        if seq == last {
            break;
        }
    }
    let tampered = tampered.expect("a device of host-00001");
    let data = tempfile::tempdir()?;
    let view = Arc::new(View::open(data.path().join("view.redb"))?);
    view.apply_batch(&events, &BatchOptions::default())?;
    drop(view);

    let out = usbpt()
        .args(["replay", "--verify"])
        .env("NATS_URL", nats.url())
        .env("USBPT_DATA_DIR", data.path())
        .output()
        .await?;
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8(out.stderr)?;
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("table device_info, key {tampered}: values differ")),
        "{err}"
    );

    // Without a live view there is nothing to verify: a one-line reason.
    let empty = tempfile::tempdir()?;
    let out = usbpt()
        .args(["replay", "--verify"])
        .env("NATS_URL", nats.url())
        .env("USBPT_DATA_DIR", empty.path())
        .output()
        .await?;
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr)?;
    assert!(
        err.starts_with("usbpt: ") && err.contains("view.redb"),
        "{err}"
    );
    Ok(())
}
