//! Headless Chromium driven over the Chrome DevTools Protocol, for the dashboard tests: Debian's
//! `chromium` started on a private profile with `--remote-debugging-port=0`, one websocket to
//! the browser, one page attached as a flattened session. Waits are event-driven: page loads
//! await `Page.loadEventFired`, DOM conditions await a `MutationObserver` inside the page, each
//! under a deadline. Console errors, uncaught exceptions and CSP violations are collected.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

/// Where Chromium is: `$CHROMIUM` when set (none if that is not a file), else the first of
/// Debian's and other usual names on `PATH` or in `/usr/bin`.
pub fn locate() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ] {
        for dir in std::env::split_paths(&path).chain([PathBuf::from("/usr/bin")]) {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// What the page reported that a test should see: console errors, exceptions, CSP violations.
pub type Problems = Arc<Mutex<Vec<String>>>;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value>>>>>;

/// One CDP event: (session id, method, params).
#[derive(Debug, Clone)]
pub struct CdpEvent {
    pub session: Option<String>,
    pub method: String,
    pub params: Value,
}

/// A running headless Chromium and its DevTools connection. Closed (and its process group
/// killed if need be) when dropped.
pub struct Browser {
    child: Child,
    pid: Option<u32>,
    out: mpsc::UnboundedSender<Message>,
    pending: Pending,
    next: Arc<AtomicU64>,
    events: broadcast::Sender<CdpEvent>,
    pub problems: Problems,
    _profile: tempfile::TempDir,
}

const CALL_TIMEOUT: Duration = Duration::from_secs(30);

impl Browser {
    pub async fn launch(binary: &Path) -> Result<Self> {
        let profile = tempfile::Builder::new()
            .prefix("usbpt-chromium-")
            .tempdir()?;
        let mut child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--mute-audio",
                "--force-color-profile=srgb",
                "--window-size=1440,960",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            // A test running under umockdev-wrapper: the browser sees the real machine.
            .env_remove("LD_PRELOAD")
            .env_remove("UMOCKDEV_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let pid = child.id();
        let stderr = child.stderr.take().context("chromium stderr")?;
        let (url_tx, url_rx) = oneshot::channel();
        // Reads the DevTools address, then keeps draining stderr so Chromium never blocks on it.
        tokio::spawn(async move {
            let mut url_tx = Some(url_tx);
            let mut tail: Vec<String> = Vec::new();
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    if let Some(tx) = url_tx.take() {
                        let _ = tx.send(Ok(url.trim().to_owned()));
                    }
                } else if url_tx.is_some() {
                    tail.push(line);
                }
            }
            if let Some(tx) = url_tx.take() {
                let _ = tx.send(Err(tail.join("\n")));
            }
        });
        let ws_url = match tokio::time::timeout(Duration::from_secs(60), url_rx).await {
            Ok(Ok(Ok(url))) => url,
            Ok(Ok(Err(stderr))) => bail!("chromium exited before DevTools listened:\n{stderr}"),
            Ok(Err(_)) => bail!("chromium's stderr reader ended"),
            Err(_) => bail!("chromium did not open DevTools within 60 s"),
        };
        let (ws, _) = tokio_tungstenite::connect_async(ws_url.as_str())
            .await
            .with_context(|| format!("connect to DevTools at {ws_url}"))?;
        let (mut sink, mut stream) = ws.split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<Message>();
        tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                if sink.send(m).await.is_err() {
                    break;
                }
            }
        });
        let pending: Pending = Arc::default();
        let problems: Problems = Arc::default();
        let (events, _) = broadcast::channel(1024);
        {
            let pending = Arc::clone(&pending);
            let problems = Arc::clone(&problems);
            let events = events.clone();
            tokio::spawn(async move {
                while let Some(Ok(msg)) = stream.next().await {
                    let Message::Text(text) = msg else { continue };
                    let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
                        continue;
                    };
                    if let Some(id) = v.get("id").and_then(Value::as_u64) {
                        let reply = match v.get("error") {
                            Some(e) => Err(anyhow!("CDP error: {e}")),
                            None => Ok(v.get("result").cloned().unwrap_or(Value::Null)),
                        };
                        if let Some(tx) = pending.lock().unwrap().remove(&id) {
                            let _ = tx.send(reply);
                        }
                    } else if let Some(method) = v.get("method").and_then(Value::as_str) {
                        let ev = CdpEvent {
                            session: v
                                .get("sessionId")
                                .and_then(Value::as_str)
                                .map(str::to_owned),
                            method: method.to_owned(),
                            params: v.get("params").cloned().unwrap_or(Value::Null),
                        };
                        if let Some(p) = problem(&ev) {
                            problems.lock().unwrap().push(p);
                        }
                        let _ = events.send(ev);
                    }
                }
                // The connection is gone: fail whatever still waits.
                for (_, tx) in pending.lock().unwrap().drain() {
                    let _ = tx.send(Err(anyhow!("the DevTools connection closed")));
                }
            });
        }
        Ok(Self {
            child,
            pid,
            out,
            pending,
            next: Arc::new(AtomicU64::new(1)),
            events,
            problems,
            _profile: profile,
        })
    }

    /// Sends one command (to a page session, or to the browser) and awaits its result.
    pub async fn call(&self, session: Option<&str>, method: &str, params: Value) -> Result<Value> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        self.out
            .send(Message::Text(msg.to_string().into()))
            .map_err(|_| anyhow!("the DevTools connection closed"))?;
        tokio::time::timeout(CALL_TIMEOUT, rx)
            .await
            .with_context(|| format!("{method} got no answer in {CALL_TIMEOUT:?}"))?
            .map_err(|_| anyhow!("{method}: the DevTools connection closed"))?
            .with_context(|| format!("{method} {params}", params = msg["params"]))
    }

    pub fn subscribe(&self) -> broadcast::Receiver<CdpEvent> {
        self.events.subscribe()
    }

    /// A new tab, attached as a flattened session, with the domains the tests use enabled.
    pub async fn new_page(&self, width: u32, height: u32) -> Result<Page<'_>> {
        let target = self
            .call(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await?;
        let target_id = target["targetId"].as_str().context("targetId")?.to_owned();
        let attached = self
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target_id, "flatten": true}),
            )
            .await?;
        let session = attached["sessionId"]
            .as_str()
            .context("sessionId")?
            .to_owned();
        let page = Page {
            browser: self,
            session,
        };
        for domain in ["Page.enable", "Runtime.enable", "Log.enable"] {
            page.call(domain, json!({})).await?;
        }
        page.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await?;
        Ok(page)
    }

    /// Closes the browser and waits for it (bounded); kills its process group otherwise.
    pub async fn close(mut self) -> Result<()> {
        let _ = self.call(None, "Browser.close", json!({})).await;
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            self.kill_group();
            self.child.wait().await?;
        }
        self.pid = None;
        Ok(())
    }

    fn kill_group(&mut self) {
        if let Some(pid) = self.pid.take() {
            // Our own child's process group (it was started with process_group(0)).
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if self.pid.is_some() {
            // A test failed before `close`: kill the group and reap the browser, briefly, so the
            // profile directory is removed after Chromium stopped writing to it.
            self.kill_group();
            for _ in 0..200 {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Turns page diagnostics into readable problems; `None` for harmless events.
fn problem(ev: &CdpEvent) -> Option<String> {
    let p = &ev.params;
    match ev.method.as_str() {
        "Runtime.exceptionThrown" => {
            let d = &p["exceptionDetails"];
            Some(format!(
                "uncaught exception: {} {}",
                d["text"].as_str().unwrap_or(""),
                d["exception"]["description"].as_str().unwrap_or("")
            ))
        }
        "Runtime.consoleAPICalled" if p["type"] == "error" => {
            let args: Vec<String> = p["args"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| x["value"].to_string() + x["description"].as_str().unwrap_or(""))
                        .collect()
                })
                .unwrap_or_default();
            Some(format!("console.error: {}", args.join(" ")))
        }
        "Log.entryAdded" if p["entry"]["level"] == "error" => Some(format!(
            "log error ({}): {} {}",
            p["entry"]["source"].as_str().unwrap_or(""),
            p["entry"]["text"].as_str().unwrap_or(""),
            p["entry"]["url"].as_str().unwrap_or("")
        )),
        _ => None,
    }
}

/// One tab.
pub struct Page<'b> {
    browser: &'b Browser,
    pub session: String,
}

impl Page<'_> {
    pub async fn call(&self, method: &str, params: Value) -> Result<Value> {
        self.browser.call(Some(&self.session), method, params).await
    }

    /// Navigates and awaits the load event.
    pub async fn goto(&self, url: &str) -> Result<()> {
        let mut events = self.browser.subscribe();
        let nav = self.call("Page.navigate", json!({"url": url})).await?;
        if let Some(err) = nav.get("errorText").and_then(Value::as_str) {
            bail!("navigating to {url}: {err}");
        }
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match events.recv().await {
                    Ok(ev)
                        if ev.method == "Page.loadEventFired"
                            && ev.session.as_deref() == Some(&self.session) =>
                    {
                        return Ok(())
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(e) => bail!("DevTools events ended: {e}"),
                }
            }
        })
        .await
        .with_context(|| format!("{url} did not load within 30 s"))?
    }

    /// Evaluates an expression (awaiting a promise) and returns its JSON value.
    pub async fn eval(&self, expression: &str) -> Result<Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await?;
        if let Some(ex) = r.get("exceptionDetails") {
            let text = ex["exception"]["description"]
                .as_str()
                .or(ex["text"].as_str())
                .unwrap_or("exception");
            bail!("{text}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// Waits until `predicate` (a JS expression) is truthy, re-checking on every DOM change
    /// inside the page; fails after `timeout` with what the page shows and reported.
    pub async fn wait_for(&self, what: &str, predicate: &str, timeout: Duration) -> Result<Value> {
        let ms = timeout.as_millis();
        let js = format!(
            r#"new Promise((resolve, reject) => {{
                const check = () => {{ try {{ return ({predicate}); }} catch (e) {{ return false; }} }};
                const first = check();
                if (first) return resolve(first);
                const done = (v) => {{ obs.disconnect(); clearTimeout(timer); resolve(v); }};
                const obs = new MutationObserver(() => {{ const v = check(); if (v) done(v); }});
                obs.observe(document, {{subtree: true, childList: true, attributes: true, characterData: true}});
                const timer = setTimeout(() => {{ obs.disconnect(); reject(new Error('timed out')); }}, {ms});
            }})"#
        );
        match tokio::time::timeout(timeout + Duration::from_secs(5), self.eval(&js)).await {
            Ok(Ok(v)) => Ok(v),
            outcome => {
                let why = match outcome {
                    Ok(Err(e)) => e.to_string(),
                    _ => "no answer".to_owned(),
                };
                let text = self
                    .eval("document.body ? document.body.innerText.slice(0, 4000) : ''")
                    .await
                    .unwrap_or_default();
                let problems = self.browser.problems.lock().unwrap().clone();
                bail!(
                    "waiting for {what} ({predicate}) failed after {timeout:?}: {why}\n\
                     page problems: {problems:?}\npage text:\n{}",
                    text.as_str().unwrap_or("")
                )
            }
        }
    }

    /// A PNG of the whole page at the viewport's width.
    pub async fn full_page_screenshot(&self) -> Result<Vec<u8>> {
        let m = self.call("Page.getLayoutMetrics", json!({})).await?;
        let size = &m["cssContentSize"];
        let (w, h) = (
            size["width"].as_f64().context("content width")?,
            size["height"].as_f64().context("content height")?,
        );
        let shot = self
            .call(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true,
                       "clip": {"x": 0, "y": 0, "width": w, "height": h, "scale": 1}}),
            )
            .await?;
        let data = shot["data"].as_str().context("screenshot data")?;
        Ok(base64::engine::general_purpose::STANDARD.decode(data)?)
    }

    /// A PNG of the viewport.
    pub async fn screenshot(&self) -> Result<Vec<u8>> {
        let shot = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await?;
        let data = shot["data"].as_str().context("screenshot data")?;
        Ok(base64::engine::general_purpose::STANDARD.decode(data)?)
    }
}
