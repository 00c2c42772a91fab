//! The `usbpt` binary against a real nats-server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../schemas/tests/common/mod.rs"]
mod common;

use anyhow::Result;
use usbpt_testkit::TestNats;

/// `usbpt`, allowed to use the test's own nats-server, which runs without authentication.
fn usbpt() -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_usbpt"));
    c.env("USBPT_INSECURE", "1");
    c
}

#[tokio::test]
async fn events_tail_prints_every_event_as_json() -> Result<()> {
    let nats = TestNats::start().await?;
    let bus = nats.bus().await?;
    let sent = common::sample_envelopes();
    for env in &sent {
        bus.publish(env).await?;
    }
    let out = usbpt()
        .args(["events", "tail", "--from-start", "--json", "--limit"])
        .arg(sent.len().to_string())
        .env("NATS_URL", nats.url())
        .output()
        .await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), sent.len());
    for (i, (line, env)) in lines.iter().zip(&sent).enumerate() {
        assert_eq!(line["seq"], i as u64 + 1);
        let decoded: usbpt_schemas::Envelope = serde_json::from_value(line["event"].clone())?;
        assert_eq!(&decoded, env);
    }
    Ok(())
}

#[tokio::test]
async fn unreachable_bus_is_one_line_on_stderr_and_nonzero() -> Result<()> {
    let mut nats = TestNats::start().await?;
    let url = nats.url();
    nats.stop().await?;
    let out = usbpt()
        .args(["events", "tail", "--limit", "1"])
        .env("NATS_URL", &url)
        .output()
        .await?;
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr)?;
    assert!(err.contains(&url) && err.starts_with("usbpt: "), "{err}");
    assert!(out.stdout.is_empty());
    Ok(())
}

#[tokio::test]
async fn help_lists_only_working_subcommands() -> Result<()> {
    let out = usbpt().arg("--help").output().await?;
    let help = String::from_utf8(out.stdout)?;
    assert!(help.contains("events"), "{help}");
    assert!(!help.to_lowercase().contains("not implemented"));
    Ok(())
}
