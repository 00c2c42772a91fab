//! `usbpt demo --exit-when-done`: the demo story end to end — device discovered on host-b,
//! flavor bound to it, server boots on host-b (not host-a), host-b reboots and the key
//! re-enumerates with a new devnum, the server keeps it (follow=lineage, re-attached through
//! libvirt's test driver), resize moves it to a second device, live migration is refused with a
//! reason, and the replayed view equals the live one. Each step checks itself; here we check the
//! process succeeded and told every step.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Context, Result};

#[tokio::test]
async fn demo_tells_the_whole_story_and_exits_zero() -> Result<()> {
    let data = tempfile::tempdir()?;
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_usbpt"))
            .args(["demo", "--exit-when-done", "--listen", "127.0.0.1:0"])
            .env_remove("NATS_URL")
            .env("USBPT_DATA_DIR", data.path())
            .env("USBPT_LOG", "warn")
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    let stdout = String::from_utf8(out.stdout)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for n in 1..=12 {
        assert!(
            stdout.contains(&format!("[{n}/12]")),
            "step {n} missing:\n{stdout}"
        );
    }
    for needle in [
        "scheduled on host-b",
        "invalidated: HostRebooted",
        "same lineage",
        "erp-1 holds device",
        "resized to erp-token",
        "refused: conflict: live migration",
        "follow=strict",
        "is available; host-b's agent tears",
        "views identical",
        "the story is complete",
    ] {
        assert!(stdout.contains(needle), "{needle:?} missing:\n{stdout}");
    }
    Ok(())
}

#[tokio::test]
async fn a_failing_step_is_named_and_exits_nonzero() -> Result<()> {
    // A bus that is not there: the demo cannot start and says why in one line.
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_usbpt"))
            .args([
                "demo",
                "--exit-when-done",
                "--listen",
                "127.0.0.1:0",
                "--nats",
                "nats://127.0.0.1:1",
            ])
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("usbpt: ") && stderr.contains("127.0.0.1:1"),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test]
async fn a_load_scenario_ends_with_the_view_matching_every_host() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let scenario = dir.path().join("load.toml");
    std::fs::write(
        &scenario,
        "[load]\nhosts = 3\ndevices_per_host = 4\nchurn_per_second = 40\nduration_seconds = 1\n",
    )?;
    let out = tokio::time::timeout(
        Duration::from_secs(180),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_usbpt"))
            .args([
                "demo",
                "--exit-when-done",
                "--listen",
                "127.0.0.1:0",
                "--scenario",
            ])
            .arg(&scenario)
            .env_remove("NATS_URL")
            .env("USBPT_DATA_DIR", dir.path().join("data"))
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    let stdout = String::from_utf8(out.stdout)?;
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("12 devices in the view"), "{stdout}");
    assert!(stdout.contains("40 re-plugs"), "{stdout}");
    assert!(stdout.contains("views identical"), "{stdout}");

    // A bad scenario is refused before anything starts, naming the file and the field.
    std::fs::write(&scenario, "[load]\nhosts = 3\ndevices = 4\n")?;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_usbpt"))
        .args(["demo", "--exit-when-done", "--scenario"])
        .arg(&scenario)
        .output()
        .await?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("load.toml") && err.contains("devices"),
        "{err}"
    );
    Ok(())
}

/// After the story (without `--exit-when-done`) the demo keeps serving and its simulated hosts'
/// agents keep running: a server booted through the Nova API afterwards is started by an agent
/// (ACTIVE is only ever an agent's report) and can be deleted; SIGTERM then stops it cleanly.
#[tokio::test]
async fn after_the_story_the_agents_keep_running() -> Result<()> {
    use tokio::io::{AsyncBufReadExt, BufReader};
    use usbpt_testkit::eventually;

    let data = tempfile::tempdir()?;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_usbpt"))
        .args(["demo", "--listen", "127.0.0.1:0"])
        .env_remove("NATS_URL")
        .env("USBPT_DATA_DIR", data.path())
        .env("USBPT_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut dashboard = None;
    let mut told = String::new();
    tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(url) = line.trim().strip_prefix("dashboard") {
                dashboard = Some(url.trim().trim_end_matches('/').to_owned());
            }
            told.push_str(&line);
            told.push('\n');
            if line.contains("keep running") {
                return Ok(());
            }
        }
        anyhow::bail!("the demo ended before serving:\n{told}")
    })
    .await??;
    assert!(told.contains("host-a, host-b"), "{told}");
    let api = dashboard.unwrap();
    // The demo wrote its API token and said where (what a user's CLI or openstack reads).
    let token_file = told
        .lines()
        .find_map(|l| l.split("API token in ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .context("the demo names its token file")?;
    let token = std::fs::read_to_string(token_file)?.trim().to_owned();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("X-Auth-Token", token.parse()?);
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .build()?;

    let flavor: serde_json::Value = http
        .post(format!("{api}/v2.1/flavors"))
        .json(&serde_json::json!({"flavor": {"name": "after-story", "ram": 0, "vcpus": 1, "disk": 0}}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let resp = http
        .post(format!("{api}/v2.1/servers"))
        .json(&serde_json::json!({"server": {
            "name": "after-1", "flavorRef": flavor["flavor"]["id"], "networks": "none"}}))
        .send()
        .await?;
    assert_eq!(resp.status(), 202);
    let id = resp.json::<serde_json::Value>().await?["server"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let server = eventually(Duration::from_secs(30), || {
        let (http, url) = (http.clone(), format!("{api}/v2.1/servers/{id}"));
        async move {
            let doc: serde_json::Value = http.get(url).send().await.ok()?.json().await.ok()?;
            (doc["server"]["status"] == "ACTIVE").then_some(doc)
        }
    })
    .await?;
    assert!(
        server["server"]["state_detail"]
            .as_str()
            .is_some_and(|d| d.contains("libvirt state")),
        "an agent started it: {server}"
    );
    let resp = http
        .delete(format!("{api}/v2.1/servers/{id}"))
        .send()
        .await?;
    assert_eq!(resp.status(), 204);
    let list: serde_json::Value = http
        .get(format!("{api}/v2.1/servers"))
        .send()
        .await?
        .json()
        .await?;
    assert!(
        !list["servers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"] == id.as_str()),
        "{list}"
    );

    let pid = child.id().unwrap();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    let exit = tokio::time::timeout(Duration::from_secs(30), child.wait()).await??;
    assert!(exit.success(), "{exit}");
    Ok(())
}
