//! `usbpt creds add-host | list | revoke` on a data dir, and the refusal of an unauthenticated
//! NATS server without `--insecure` (ADR 0005).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;

use anyhow::Result;
use usbpt_testkit::TestNats;

fn usbpt(data: &std::path::Path) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_usbpt"));
    c.arg("--data-dir")
        .arg(data)
        .env_remove("USBPT_INSECURE")
        .env_remove("NATS_CREDS")
        .env_remove("NATS_URL");
    c
}

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn creds_add_list_revoke() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let out = usbpt(&data)
        .args(["creds", "add-host", "host-a"])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seed = data.join("creds/agent-host-a.nk");
    assert_eq!(mode(&seed), 0o600);
    assert_eq!(mode(&data.join("creds")), 0o700);
    assert_eq!(mode(&data.join("creds/nats-auth.conf")), 0o600);
    let conf = std::fs::read_to_string(data.join("creds/nats-auth.conf"))?;
    assert!(conf.contains("usbpt.evt.host.host-a.>"));
    let secret = std::fs::read_to_string(&seed)?;
    assert!(
        !conf.contains(secret.trim()),
        "the server config holds no seed"
    );

    let out = usbpt(&data).args(["creds", "list", "--json"]).output()?;
    assert!(out.status.success());
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let names: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["agent-host-a"]);
    assert!(rows[0]["public_key"].as_str().unwrap().starts_with('U'));
    assert!(!String::from_utf8_lossy(&out.stdout).contains(secret.trim()));

    let out = usbpt(&data).args(["creds", "revoke", "host-a"]).output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!seed.exists());
    let conf = std::fs::read_to_string(data.join("creds/nats-auth.conf"))?;
    assert!(!conf.contains("host-a"));
    let out = usbpt(&data).args(["creds", "revoke", "host-a"]).output()?;
    assert!(!out.status.success(), "revoking twice is an error");
    let out = usbpt(&data).args(["creds", "revoke", "a.>"]).output()?;
    assert!(!out.status.success());
    Ok(())
}

#[tokio::test]
async fn an_unauthenticated_server_is_refused_without_insecure() -> Result<()> {
    let nats = TestNats::start().await?;
    let dir = tempfile::tempdir()?;
    let tail = |insecure: bool| {
        let mut c = usbpt(dir.path());
        c.args([
            "--nats",
            &format!("nats://user:hunter2@127.0.0.1:{}", nats.port()),
            "events",
            "tail",
            "--from-start",
            "--limit",
            "0",
        ]);
        if insecure {
            c.env("USBPT_INSECURE", "1");
        }
        c.output()
    };
    let refused = tail(false)?;
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("without authentication"), "{err}");
    assert!(!err.contains("hunter2"), "the password was printed: {err}");
    let allowed = tail(true)?;
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );
    Ok(())
}
