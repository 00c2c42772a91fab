//! `usbpt bench --quick --json` as CI runs it: it finishes, prints one JSON document with every
//! figure, each sane (rates and latencies positive, ratios computed). Correctness only: no
//! figure's speed is asserted. `--only` measures just the sections it names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

/// Every figure a run against private servers reports, and what each must carry.
const RATES: &[&str] = &[
    "codec_encode",
    "codec_decode",
    "codec_json_encode",
    "agent_publish",
    "raw_publish_each_ack",
    "raw_publish_inflight",
    "hotplug_to_view",
    "hotplug_to_view.view_sync_100ms",
    "raw_hotplug_path",
    "view_device_lookup",
    "api_get_device",
    "boot_uncontended",
    "boot_uncontended.view_sync_100ms",
    "claims",
    "claims.view_sync_100ms",
    "raw_fenced_publish",
    "agent_publish.sync_always",
    "raw_publish_each_ack.sync_always",
    "raw_publish_inflight.sync_always",
    "hotplug_to_view.sync_always",
    "raw_hotplug_path.sync_always",
    "schedule_decide",
    "setup_publish_history",
    "fold_live",
    "replay",
    "replay_verify",
    "raw_ordered_read",
    "raw_ordered_push_read",
    "raw_push_noack_read",
    "raw_read_insert",
    "raw_read_insert_nosync",
    "raw_redb_insert",
    "raw_redb_insert_nosync",
];
const LATENCIES: &[&str] = &[
    "raw_publish_each_ack",
    "hotplug_to_view",
    "raw_hotplug_path",
    "view_device_lookup",
    "api_get_device",
    "boot_uncontended",
    "boot_uncontended.view_sync_100ms",
    "claims",
    "claims.view_sync_100ms",
    "raw_fenced_publish",
    "hotplug_to_view.sync_always",
    "hotplug_to_view.view_sync_100ms",
    "schedule_decide",
    "schedule_query",
    "raw_index_scan",
];
const VALUES: &[&str] = &[
    "size_postcard",
    "size_json",
    "size_api_device_json",
    "size_nova_device_json",
    "view_file_size",
    "claims",
    "claims.view_sync_100ms",
    "agent_idle_cpu",
    "agent_rss",
];
const RATIOS: &[&str] = &[
    "agent_publish",
    "agent_publish.sync_always",
    "hotplug_to_view",
    "hotplug_to_view.sync_always",
    "hotplug_to_view.view_sync_100ms",
    "claims",
    "claims.view_sync_100ms",
    "schedule_decide",
    "fold_live",
    "replay",
];
const FLOORS: &[&str] = &[
    "hotplug_to_view",
    "schedule_decide",
    "fold_live",
    "replay_verify",
];

fn positive(f: &Value, field: &str) -> bool {
    f[field].as_f64().is_some_and(|v| v > 0.0 && v.is_finite())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_quick_prints_every_figure_as_one_json_document() -> Result<()> {
    let out = tokio::time::timeout(
        Duration::from_secs(240),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_usbpt"))
            .args(["bench", "--quick", "--json"])
            .env_remove("NATS_URL")
            .env("USBPT_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("usbpt bench --quick did not finish within 240 s")??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert!(out.status.success(), "usbpt bench failed: {stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "stdout is not one JSON document: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    assert_eq!(report["mode"], "quick");
    assert_eq!(
        report["sections"],
        serde_json::json!(["codec", "publish", "hotplug", "claims", "sched", "fold", "idle"]),
        "without --only every section runs"
    );
    assert_eq!(
        report["nats_servers"].as_array().map(Vec::len),
        Some(2),
        "a private server with default fsync and one with sync_interval: always"
    );
    let figures = report["figures"].as_array().context("figures")?;
    let find = |key: &str| -> &Value {
        figures
            .iter()
            .find(|f| f["key"] == key)
            .unwrap_or_else(|| panic!("figure {key} is missing"))
    };
    for key in RATES {
        assert!(positive(find(key), "rate_per_s"), "{key}: no positive rate");
    }
    for key in LATENCIES {
        let f = find(key);
        for p in ["p50_us", "p99_us", "max_us"] {
            assert!(positive(f, p), "{key}: no positive {p}");
        }
        assert!(
            f["p50_us"].as_f64() <= f["p99_us"].as_f64(),
            "{key}: p50 > p99"
        );
        assert!(
            f["p99_us"].as_f64() <= f["max_us"].as_f64(),
            "{key}: p99 > max"
        );
    }
    for key in VALUES {
        let v = &find(key)["value"];
        assert!(
            v["value"].as_f64().is_some_and(f64::is_finite),
            "{key}: no value"
        );
        assert!(
            v["unit"].as_str().is_some_and(|u| !u.is_empty()),
            "{key}: no unit"
        );
    }
    for key in ["size_postcard", "size_json", "agent_rss"] {
        assert!(
            positive(&find(key)["value"], "value"),
            "{key}: not positive"
        );
    }
    assert!(
        find("size_postcard")["value"]["value"].as_f64()
            < find("size_json")["value"]["value"].as_f64(),
        "postcard is smaller than JSON"
    );
    for key in RATIOS {
        let r = &find(key)["vs_raw"];
        assert!(positive(r, "ratio"), "{key}: no ratio to its raw figure");
        let raw = r["raw"].as_str().context("raw key")?;
        find(raw);
    }
    for key in FLOORS {
        assert!(
            find(key)["floor"]["met"].is_boolean(),
            "{key}: no floor verdict"
        );
    }
    let keys: Vec<&str> = figures.iter().filter_map(|f| f["key"].as_str()).collect();
    let unique: std::collections::BTreeSet<_> = keys.iter().collect();
    assert_eq!(unique.len(), keys.len(), "figure keys are unique: {keys:?}");
    Ok(())
}

#[tokio::test]
async fn bench_refuses_a_server_that_holds_usbpt_history() -> Result<()> {
    let nats = usbpt_testkit::TestNats::start().await?;
    let _bus = nats.bus().await?; // creates USBPT_EVENTS
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_usbpt"))
        .args(["bench", "--quick", "--nats", &nats.url()])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("already has a stream USBPT_EVENTS"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    Ok(())
}

#[tokio::test]
async fn bench_against_a_given_server_measures_once_and_removes_its_streams() -> Result<()> {
    let nats = usbpt_testkit::TestNats::start().await?;
    let out = tokio::time::timeout(
        Duration::from_secs(240),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_usbpt"))
            .args(["bench", "--quick", "--json", "--nats", &nats.url()])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("usbpt bench --quick --nats did not finish within 240 s")??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "usbpt bench failed: {stderr}");
    let report: Value = serde_json::from_slice(&out.stdout)?;
    let servers = report["nats_servers"].as_array().context("servers")?;
    assert_eq!(servers.len(), 1);
    assert!(servers[0].as_str().is_some_and(|s| s.contains(&nats.url())));
    let figures = report["figures"].as_array().context("figures")?;
    assert!(figures.iter().any(|f| f["key"] == "hotplug_to_view"));
    assert!(
        !figures.iter().any(|f| f["key"]
            .as_str()
            .is_some_and(|k| k.ends_with(".sync_always"))),
        "the given server's fsync is its own: no second run"
    );
    let admin = usbpt_bus::admin::StreamAdmin::connect(&nats.url()).await?;
    for name in ["USBPT_EVENTS", "USBPT_BENCH_RAW"] {
        assert!(!admin.stream_exists(name).await?, "{name} was left behind");
    }
    Ok(())
}

#[tokio::test]
async fn bench_only_measures_the_sections_named_and_refuses_unknown_ones() -> Result<()> {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_usbpt"))
            .args(["bench", "--quick", "--only", "codec", "--json"])
            .env_remove("NATS_URL")
            .env("USBPT_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("usbpt bench --quick --only codec did not finish within 120 s")??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "usbpt bench --only codec failed: {stderr}"
    );
    let report: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["sections"], serde_json::json!(["codec"]));
    let figures = report["figures"].as_array().context("figures")?;
    let has = |key: &str| figures.iter().any(|f| f["key"] == key);
    for key in ["codec_encode", "codec_decode", "size_postcard", "size_json"] {
        assert!(has(key), "codec figure {key} is missing");
    }
    for key in ["fold_live", "replay", "hotplug_to_view", "agent_rss"] {
        assert!(!has(key), "{key} was measured without being selected");
    }

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_usbpt"))
        .args(["bench", "--quick", "--only", "codec,nonsense"])
        .env_remove("NATS_URL")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await?;
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nonsense"), "{stderr}");
    for name in [
        "codec", "publish", "hotplug", "claims", "sched", "fold", "idle",
    ] {
        assert!(stderr.contains(name), "the error names {name}: {stderr}");
    }
    Ok(())
}
