//! Shared by the `agent_*` tests: the `usbpt agent` process under umockdev, and the stream read
//! back and folded.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use usbpt_bus::{Bus, StartAt};
use usbpt_schemas::{DeviceDiscovered, DeviceId, DeviceInvalidated, Envelope, Event};
use usbpt_testkit::umockdev::{die_with_parent, four_recordings};

/// How long any single wait may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(60);

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("agent/tests/fixtures/umockdev")
}

/// The four recorded devices as one host (see `usbpt_testkit::umockdev::four_recordings`).
pub fn host_recording() -> Result<String> {
    four_recordings(&fixtures())
}

/// Where an agent keeps its state and reads its boot id.
pub struct AgentHome {
    pub dir: tempfile::TempDir,
    pub host: String,
}

impl AgentHome {
    pub fn new(host: &str, boot_id: &str) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("usbpt-agent-").tempdir()?;
        let home = Self {
            dir,
            host: host.to_owned(),
        };
        home.set_boot_id(boot_id)?;
        Ok(home)
    }
    pub fn boot_file(&self) -> PathBuf {
        self.dir.path().join("boot_id")
    }
    /// A reboot, as far as the agent can tell.
    pub fn set_boot_id(&self, id: &str) -> Result<()> {
        std::fs::write(self.boot_file(), format!("{id}\n")).context("write boot id")
    }
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

/// A running `usbpt agent`. Killed (SIGKILL) when dropped and when the test thread ends.
pub struct AgentProcess {
    child: Child,
    progress: mpsc::UnboundedReceiver<Value>,
    /// Its `ready` progress line.
    pub ready: Value,
}

impl AgentProcess {
    /// Starts the agent (it inherits the umockdev preload and testbed) and waits until it is
    /// watching: its `ready` progress line.
    pub async fn start(home: &AgentHome, nats_url: &str) -> Result<Self> {
        Self::start_with(home, nats_url, &[]).await
    }

    pub async fn start_with(home: &AgentHome, nats_url: &str, extra: &[&str]) -> Result<Self> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_usbpt"));
        cmd.env("USBPT_INSECURE", "1");
        cmd.arg("agent")
            .args(["--host", &home.host])
            .arg("--boot-id-file")
            .arg(home.boot_file())
            .args(["--hypervisor", "test:///default"])
            .args(extra)
            .env("NATS_URL", nats_url)
            .env("USBPT_DATA_DIR", home.data_dir())
            .env(
                "USBPT_LOG",
                std::env::var("USBPT_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().context("spawn usbpt agent")?;
        let stdout = child.stdout.take().context("agent stdout")?;
        let (tx, progress) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if !line.contains(r#""progress":"queued""#) {
                    println!("  agent> {line}");
                }
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => {
                        if tx.send(v).is_err() {
                            break;
                        }
                    }
                    Err(e) => println!("  (not a progress line: {e})"),
                }
            }
        });
        let mut agent = Self {
            child,
            progress,
            ready: Value::Null,
        };
        agent.ready = agent.expect("ready").await?;
        Ok(agent)
    }

    /// Waits for the next progress line of `kind`, skipping others.
    pub async fn expect(&mut self, kind: &str) -> Result<Value> {
        self.expect_where(kind, |_| true).await
    }

    /// Waits for a progress line of `kind` that satisfies `check`.
    pub async fn expect_where(
        &mut self,
        kind: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let line = tokio::time::timeout_at(deadline, self.progress.recv())
                .await
                .map_err(|_| anyhow!("no {kind:?} progress from the agent within {WAIT:?}"))?
                .ok_or_else(|| anyhow!("the agent exited before reporting {kind:?}"))?;
            if line["progress"] == kind && check(&line) {
                return Ok(line);
            }
        }
    }

    /// SIGTERM, then waits for a clean exit.
    pub async fn stop(mut self) -> Result<()> {
        let pid = self.child.id().context("agent already reaped")?;
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM {pid} failed");
        }
        let exit = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .context("agent did not stop on SIGTERM")??;
        if !exit.success() {
            bail!("agent exited with {exit}");
        }
        Ok(())
    }

    /// The process id, for signals.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL: a crash.
    pub async fn crash(mut self) -> Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}

/// Everything in the stream, read from the beginning, decoded.
pub struct StreamLog {
    pub events: Vec<(u64, String, Envelope)>,
    reader: usbpt_bus::Reader,
}

impl StreamLog {
    pub async fn open(bus: &Bus) -> Result<Self> {
        Ok(Self {
            events: Vec::new(),
            reader: bus.reader(StartAt::Beginning, None).await?,
        })
    }

    /// Reads until `done(all events so far)` holds; fails after [`WAIT`].
    pub async fn until(&mut self, what: &str, done: impl Fn(&[Envelope]) -> bool) -> Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut envs: Vec<Envelope> = self.events.iter().map(|(_, _, e)| e.clone()).collect();
        loop {
            if done(&envs) {
                return Ok(());
            }
            let msg = tokio::time::timeout_at(deadline, self.reader.next())
                .await
                .map_err(|_| {
                    anyhow!(
                        "stream: {what} not seen within {WAIT:?}; got {} events: {:?}",
                        envs.len(),
                        envs.iter().map(|e| e.body.kind()).collect::<Vec<_>>()
                    )
                })?
                .map_err(|e| anyhow!("reading the stream: {e}"))?;
            let env = msg.decode().map_err(|e| anyhow!("seq {}: {e}", msg.seq))?;
            envs.push(env.clone());
            self.events.push((msg.seq, msg.subject, env));
        }
    }

    /// Reads until at least `n` events of kind `kind` are in.
    pub async fn until_count(&mut self, kind: &str, n: usize) -> Result<()> {
        self.until(&format!("{n} × {kind}"), |e| count(e, kind) >= n)
            .await
    }

    pub fn envelopes(&self) -> Vec<Envelope> {
        self.events.iter().map(|(_, _, e)| e.clone()).collect()
    }
    /// Events after the first `skip`.
    pub fn since(&self, skip: usize) -> Vec<Envelope> {
        self.events[skip.min(self.events.len())..]
            .iter()
            .map(|(_, _, e)| e.clone())
            .collect()
    }
}

/// The fact an event records: its kind, with a discovery of either layout (`DeviceDiscovered`,
/// `DeviceDiscoveredV2` with a fingerprint) read as `DeviceDiscovered`. The identity tests are
/// about lineages, not layouts: a recorded device has descriptors (V2), a made-up one has none
/// (V1). `tests/agent_fingerprint.rs` checks the layout and the fingerprint.
pub fn fact(e: &Envelope) -> &'static str {
    match e.body.discovery() {
        Some(_) => "DeviceDiscovered",
        None => e.body.kind(),
    }
}
pub fn count(events: &[Envelope], kind: &str) -> usize {
    events.iter().filter(|e| fact(e) == kind).count()
}
pub fn kinds(events: &[Envelope]) -> Vec<&'static str> {
    events.iter().map(fact).collect()
}
pub fn discovered(events: &[Envelope]) -> Vec<DeviceDiscovered> {
    events
        .iter()
        .filter_map(|e| e.body.discovery().map(|(d, _)| d.clone()))
        .collect()
}
pub fn invalidated(events: &[Envelope]) -> Vec<DeviceInvalidated> {
    events
        .iter()
        .filter_map(|e| match &e.body {
            Event::DeviceInvalidated(d) => Some(d.clone()),
            _ => None,
        })
        .collect()
}

/// The enumerations the stream says are live: discovered and not invalidated.
pub fn live(events: &[Envelope]) -> BTreeMap<DeviceId, DeviceDiscovered> {
    let mut live = BTreeMap::new();
    for e in events {
        match (&e.body, e.body.discovery()) {
            (_, Some((d, _))) => {
                live.insert(d.device_id, d.clone());
            }
            (Event::DeviceInvalidated(i), _) => {
                live.remove(&i.device_id);
            }
            _ => {}
        }
    }
    live
}

/// Checks the history is well formed: event ids unique; each device id discovered once and
/// invalidated at most once, after its discovery; `supersedes` and `superseded_by` name
/// enumerations of the same lineage.
pub fn check_history(events: &[Envelope]) -> Result<()> {
    let mut ids = BTreeSet::new();
    let mut found: BTreeMap<DeviceId, DeviceDiscovered> = BTreeMap::new();
    let mut ended = BTreeSet::new();
    let mut successors = Vec::new();
    for e in events {
        if !ids.insert(e.event_id) {
            bail!("event {} is in the stream twice", e.event_id);
        }
        match (&e.body, e.body.discovery()) {
            (_, Some((d, _))) => {
                if found.insert(d.device_id, d.clone()).is_some() {
                    bail!("device {} discovered twice", d.device_id);
                }
                if let Some(prev) = d.supersedes {
                    let p = found
                        .get(&prev)
                        .ok_or_else(|| anyhow!("{} supersedes unknown {prev}", d.device_id))?;
                    if p.lineage_id != d.lineage_id {
                        bail!("{} supersedes {prev} of another lineage", d.device_id);
                    }
                }
            }
            (Event::DeviceInvalidated(i), _) => {
                if !found.contains_key(&i.device_id) {
                    bail!(
                        "device {} invalidated before it was discovered",
                        i.device_id
                    );
                }
                if !ended.insert(i.device_id) {
                    bail!("device {} invalidated twice", i.device_id);
                }
                successors.push(i.clone());
            }
            _ => {}
        }
    }
    for i in successors {
        if let Some(next) = i.superseded_by {
            let n = found
                .get(&next)
                .ok_or_else(|| anyhow!("{} superseded by unknown {next}", i.device_id))?;
            if n.lineage_id != i.lineage_id || n.supersedes != Some(i.device_id) {
                bail!(
                    "{} superseded by {next}, which does not supersede it in the same lineage",
                    i.device_id
                );
            }
        }
    }
    Ok(())
}
