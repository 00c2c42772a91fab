//! Shared by the `projector_*` tests: runs `usbpt serve` against a real nats-server and reads
//! what it announces; runs CLI queries; waits for the view through the API.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// The HTTP API token of the tests' `usbpt serve` (in the environment of every `usbpt` they
/// run: `serve` requires it, the CLI sends it).
pub const API_TOKEN: &str = "test-token-0123456789abcdef";

/// `usbpt`, allowed to use the test's own nats-server, which runs without authentication, with
/// the tests' API token.
pub fn usbpt() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_usbpt"));
    c.env("USBPT_INSECURE", "1")
        .env("USBPT_API_TOKEN", API_TOKEN)
        .env_remove("USBPT_API_TOKEN_FILE");
    c
}

/// An HTTP client that sends [`API_TOKEN`] with every request.
pub fn http() -> reqwest::Client {
    http_with(API_TOKEN)
}

/// An HTTP client that sends `token` as `Authorization: Bearer`.
pub fn http_with(token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

/// A running `usbpt serve` (killed when dropped).
pub struct Serve {
    pub child: Child,
    pub api: String,
    pub data: PathBuf,
    pub nats: String,
}

impl Serve {
    /// Starts `usbpt serve` on a free loopback port; returns once it announced its address.
    pub async fn start(nats: &str, data: &Path) -> Result<Self> {
        Self::start_with(nats, data, &[]).await
    }

    /// [`Serve::start`] with more `usbpt serve` arguments.
    pub async fn start_with(nats: &str, data: &Path, extra: &[&str]) -> Result<Self> {
        let mut child = usbpt()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(extra)
            .env("NATS_URL", nats)
            .env("USBPT_DATA_DIR", data)
            .env("USBPT_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawn usbpt serve")?;
        let stderr = child.stderr.take().context("stderr")?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[serve] {line}");
                let _ = tx.send(line);
            }
        });
        let api = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = rx.recv().await {
                if let Some(url) = line.split("listening on ").nth(1) {
                    return Ok(url.trim().to_owned());
                }
            }
            bail!("usbpt serve exited before listening")
        })
        .await
        .context("usbpt serve did not announce its address")??;
        Ok(Self {
            child,
            api,
            data: data.to_path_buf(),
            nats: nats.to_owned(),
        })
    }

    pub async fn get(&self, path: &str) -> Result<(u16, Value)> {
        let resp = http().get(format!("{}{path}", self.api)).send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        let json = serde_json::from_str(&text).with_context(|| format!("not JSON: {text}"))?;
        Ok((status, json))
    }

    pub async fn get_text(&self, path: &str) -> Result<String> {
        Ok(http()
            .get(format!("{}{path}", self.api))
            .send()
            .await?
            .text()
            .await?)
    }

    /// Waits (server side) until the view has applied `seq`.
    pub async fn wait_applied(&self, seq: u64) -> Result<()> {
        let (status, doc) = self
            .get(&format!("/v1/status?min_seq={seq}&timeout_ms=30000"))
            .await?;
        if status != 200 || doc["reached"] != Value::Bool(true) {
            bail!("view did not reach {seq}: {doc}");
        }
        Ok(())
    }

    /// Runs a CLI query against this server; returns (success, stdout, stderr).
    pub async fn cli(&self, args: &[&str]) -> Result<(bool, String, String)> {
        let out = usbpt()
            .args(args)
            .env("NATS_URL", &self.nats)
            .env("USBPT_API", &self.api)
            .env("USBPT_DATA_DIR", &self.data)
            .output()
            .await?;
        Ok((
            out.status.success(),
            String::from_utf8(out.stdout)?,
            String::from_utf8(out.stderr)?,
        ))
    }

    /// Waits until the command service answers over NATS: `usbpt serve` announces its HTTP
    /// address before its command subscription is in place, so a CLI command sent at once may
    /// find no responders. Probes with a command that is always refused (an unknown server).
    pub async fn commands_ready(&self) -> Result<()> {
        usbpt_testkit::eventually(Duration::from_secs(30), || async {
            let (_, _, err) = self.cli(&["delete", "no-such-server"]).await.ok()?;
            (!err.contains("no responders")).then_some(())
        })
        .await
        .context("the command service did not answer over NATS")
    }

    /// A `--json` query: exactly one JSON document on stdout.
    pub async fn cli_json(&self, args: &[&str]) -> Result<Value> {
        let (ok, out, err) = self.cli(args).await?;
        if !ok {
            bail!("usbpt {args:?} failed: {err}");
        }
        serde_json::from_str(&out)
            .with_context(|| format!("stdout is not one JSON document: {out}"))
    }
}
