//! `usbpt up` as a process: starts a private nats-server and the whole control plane, serves the
//! API, stops cleanly on SIGTERM, and a second start on the same data dir resumes the history.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

struct Up {
    child: Child,
    api: String,
    lines: mpsc::UnboundedReceiver<String>,
}

async fn start(data: &std::path::Path) -> Result<Up> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_usbpt"))
        .args([
            "up",
            "--listen",
            "127.0.0.1:0",
            "--fast-fsync",
            "--host",
            "test-host",
        ])
        .env_remove("NATS_URL")
        .env("USBPT_DATA_DIR", data)
        .env("USBPT_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let (tx, mut lines) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(l)) = out.next_line().await {
            eprintln!("[up] {l}");
            let _ = tx.send(l);
        }
    });
    let mut api = None;
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(l) = lines.recv().await {
            if let Some(u) = l.split("API and dashboard ").nth(1) {
                api = Some(u.trim().trim_end_matches('/').to_owned());
            }
            if l.contains("usbpt up: ready") {
                return Ok(());
            }
        }
        bail!("usbpt up exited before it was ready")
    })
    .await??;
    Ok(Up {
        child,
        api: api.context("no API line")?,
        lines,
    })
}

async fn sigterm_and_wait(mut up: Up) -> Result<()> {
    let pid = up.child.id().context("pid")?;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(30), up.child.wait()).await??;
    assert!(exit.success(), "usbpt up exited with {exit}");
    let mut said_stopped = false;
    while let Ok(l) = up.lines.try_recv() {
        said_stopped |= l.contains("usbpt up: stopped");
    }
    assert!(said_stopped, "no 'stopped' line");
    Ok(())
}

#[tokio::test]
async fn up_stops_on_sigterm_and_resumes_its_history() -> Result<()> {
    let data = tempfile::tempdir()?;
    let up = start(data.path()).await?;
    // `up` generated the API token at its first start: a private file under the data dir.
    let token_file = data.path().join("api-token");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&token_file)?.permissions());
    assert_eq!(mode & 0o777, 0o600, "api-token mode {mode:o}");
    let token = std::fs::read_to_string(&token_file)?.trim().to_owned();
    assert_eq!(token.len(), 64, "32 random bytes in hex");
    let http = reqwest::Client::new();
    let refused = http.get(format!("{}/v2.1/flavors", up.api)).send().await?;
    assert_eq!(refused.status().as_u16(), 401, "no token");
    // The CLI beside `up` finds the token in the data dir by itself; a wrong one is refused.
    let cli = |token: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_usbpt"));
        c.args(["flavor", "list", "--json"])
            .env_remove("NATS_URL")
            .env_remove("USBPT_API_TOKEN_FILE")
            .env("USBPT_DATA_DIR", data.path())
            .env("USBPT_API", &up.api);
        match token {
            Some(t) => c.env("USBPT_API_TOKEN", t),
            None => c.env_remove("USBPT_API_TOKEN"),
        };
        c.output()
    };
    let out = cli(None).await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(Some("a-wrong-token-of-some-length")).await?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("403"), "{err}");
    assert!(
        !err.contains("a-wrong-token"),
        "the token was echoed: {err}"
    );
    let created = http
        .post(format!("{}/v2.1/flavors", up.api))
        .bearer_auth(&token)
        .json(
            &serde_json::json!({"flavor": {"name": "kept", "usb_devices": [
                {"vendor_id": "136b", "product_id": "0003", "count": 1, "controller": "xhci"}
            ]}}),
        )
        .send()
        .await?;
    // Nova answers a created flavor with 200 and the flavor.
    assert_eq!(created.status().as_u16(), 200, "{}", created.text().await?);
    let bad = http
        .post(format!("{}/v2.1/flavors", up.api))
        .bearer_auth(&token)
        .json(&serde_json::json!({"flavor": {"name": "a.>", "usb_devices": []}}))
        .send()
        .await?;
    assert_eq!(bad.status().as_u16(), 400);
    let body: serde_json::Value = bad.json().await?;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("a.>"),
        "{body}"
    );
    sigterm_and_wait(up).await?;

    let up = start(data.path()).await?;
    // The same token after a restart.
    assert_eq!(std::fs::read_to_string(&token_file)?.trim(), token);
    let flavors: serde_json::Value = http
        .get(format!("{}/v2.1/flavors", up.api))
        .header("X-Auth-Token", &token)
        .send()
        .await?
        .json()
        .await?;
    assert!(
        flavors.to_string().contains("\"kept\""),
        "history not resumed: {flavors}"
    );
    sigterm_and_wait(up).await?;
    Ok(())
}
