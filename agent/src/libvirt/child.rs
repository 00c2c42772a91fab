//! The executor in a child process (ADR 0016): the host agent — the process that parses what
//! devices say and talks to NATS — does not link libvirt. When it has libvirt work it starts
//! `usbpt agent-executor` (the [`ExecutorCommand`]), which connects to libvirt and says
//! [`Reply::Ready`]; requests and replies go over the child's stdin and stdout
//! ([`super::protocol`]). After [`ChildExecutor::idle`] without work the agent closes the
//! child's stdin and the child exits, so an idle agent holds no libvirt at all.
//!
//! A child that dies (or answers nonsense) is stopped and the request is sent once more to a
//! fresh one: every piece of work is safe to carry out twice (redeliveries already are, and
//! each operation reports the state it finds). When that fails too, the work is reported as
//! failed: `ServerStateChanged { Error }` (with a `DeviceAttachFailed` per device of a
//! definition), naming the executor process; a re-attach or a resume after a host reboot, which
//! name no server before libvirt is read, is logged as an error. Nothing is dropped silently,
//! and the control message is acknowledged only after that outcome is in the outbox, as before.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use thiserror::Error;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::Mutex;
use tracing::{error, info, warn};
use usbpt_schemas::{
    DeviceAttachFailed, DeviceId, Envelope, Event, HostName, LineageId, ServerState,
    ServerStateChanged,
};

use super::hands::{DeviceMap, Hands};
use super::protocol::{device_list, read_frame, write_frame, Reply, Request};
use super::work::{work_for, DeviceInfo, Work};

/// How long a child may stay idle by default before it is stopped.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(30);
/// How long a starting child may take to connect to libvirt and say it is ready.
const READY_WAIT: Duration = Duration::from_secs(60);
/// How long a child whose stdin was closed may take to exit before it is killed.
const EXIT_WAIT: Duration = Duration::from_secs(5);

/// How to start the executor process: `usbpt agent-executor --host H --hypervisor URI`.
#[derive(Debug, Clone)]
pub struct ExecutorCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Set in the child's environment (which is otherwise the agent's).
    pub envs: Vec<(OsString, OsString)>,
}

impl ExecutorCommand {
    /// `program agent-executor --host HOST --hypervisor URI`.
    pub fn usbpt(program: impl Into<PathBuf>, host: &HostName, uri: &str) -> Self {
        Self {
            program: program.into(),
            args: vec![
                "agent-executor".into(),
                "--host".into(),
                host.as_str().into(),
                "--hypervisor".into(),
                uri.into(),
            ],
            envs: Vec::new(),
        }
    }
}

/// Why the executor process could not carry out a request.
#[derive(Debug, Error)]
pub enum ChildError {
    #[error("cannot start the executor process {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    /// The child started but could not reach libvirt.
    #[error("the executor process cannot reach libvirt: {0}")]
    Refused(String),
    /// The child died, or its stdin/stdout failed, before it answered.
    #[error("the executor process was lost: {0}")]
    Lost(String),
}

struct Running {
    process: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    pid: Option<u32>,
    domain_type: String,
}

struct Slot {
    running: Option<Running>,
    /// Bumped at every start, so that an idle timer only stops the child it was started for.
    generation: u64,
    last_used: Instant,
}

/// The executor in a child process, started on demand and stopped when idle. Implements
/// [`Hands`] for the agent's control loop.
pub struct ChildExecutor {
    host: HostName,
    command: ExecutorCommand,
    idle: Duration,
    slot: Arc<Mutex<Slot>>,
    starts: AtomicU64,
}

impl std::fmt::Debug for ChildExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildExecutor")
            .field("host", &self.host)
            .field("command", &self.command)
            .field("idle", &self.idle)
            .finish()
    }
}

impl ChildExecutor {
    pub fn new(host: HostName, command: ExecutorCommand, idle: Duration) -> Self {
        Self {
            host,
            command,
            idle,
            slot: Arc::new(Mutex::new(Slot {
                running: None,
                generation: 0,
                last_used: Instant::now(),
            })),
            starts: AtomicU64::new(0),
        }
    }

    /// How long the child may stay without work before it is stopped.
    pub fn idle(&self) -> Duration {
        self.idle
    }

    /// Starts the child now (unless it runs) and waits until it has connected to libvirt: the
    /// agent's start-up check that the hypervisor is there. The child then stops when idle.
    /// Returns the domain type it defines.
    pub async fn start(&self) -> Result<String, ChildError> {
        let mut slot = self.slot.lock().await;
        self.ensure(&mut slot).await
    }

    /// The running child's process id, if one runs.
    pub async fn pid(&self) -> Option<u32> {
        let mut slot = self.slot.lock().await;
        let running = slot.running.as_mut()?;
        match running.process.try_wait() {
            Ok(None) => running.pid,
            _ => None,
        }
    }

    /// How many children were started so far.
    pub fn starts(&self) -> u64 {
        self.starts.load(Ordering::Relaxed)
    }

    /// Stops the child now, if one runs.
    pub async fn stop(&self) {
        let running = self.slot.lock().await.running.take();
        if let Some(r) = running {
            stop(r).await;
        }
    }

    /// Starts a child when none runs (or the one there has exited). Returns its domain type.
    async fn ensure(&self, slot: &mut Slot) -> Result<String, ChildError> {
        if let Some(r) = slot.running.as_mut() {
            match r.process.try_wait() {
                Ok(None) => return Ok(r.domain_type.clone()),
                _ => {
                    warn!(pid = r.pid, "the executor process exited on its own");
                    slot.running = None;
                }
            }
        }
        let started = Instant::now();
        let mut process = Command::new(&self.command.program)
            .args(&self.command.args)
            .envs(self.command.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| ChildError::Spawn {
                program: self.command.program.display().to_string(),
                source,
            })?;
        self.starts.fetch_add(1, Ordering::Relaxed);
        let pid = process.id();
        let (Some(stdin), Some(mut stdout)) = (process.stdin.take(), process.stdout.take()) else {
            return Err(ChildError::Lost("no stdin/stdout pipes".into()));
        };
        let hello = tokio::time::timeout(READY_WAIT, read_frame::<_, Reply>(&mut stdout)).await;
        let domain_type = match hello {
            Ok(Ok(Some(Reply::Ready { domain_type }))) => domain_type,
            Ok(Ok(Some(Reply::Refused { error }))) => {
                let _ = tokio::time::timeout(EXIT_WAIT, process.wait()).await;
                return Err(ChildError::Refused(error));
            }
            other => {
                let _ = process.start_kill();
                let status = tokio::time::timeout(EXIT_WAIT, process.wait()).await;
                return Err(ChildError::Lost(format!(
                    "no ready message ({}; {})",
                    describe(other.ok()),
                    exit_text(status.ok())
                )));
            }
        };
        info!(
            pid,
            domain_type,
            start_ms = started.elapsed().as_millis() as u64,
            "executor process started"
        );
        slot.generation += 1;
        slot.last_used = Instant::now();
        slot.running = Some(Running {
            process,
            stdin,
            stdout,
            pid,
            domain_type: domain_type.clone(),
        });
        self.stop_when_idle(slot.generation);
        Ok(domain_type)
    }

    /// Stops the child started as `generation` once it has had no work for [`Self::idle`].
    fn stop_when_idle(&self, generation: u64) {
        let slot = self.slot.clone();
        let idle = self.idle;
        tokio::spawn(async move {
            let mut wait = idle;
            loop {
                tokio::time::sleep(wait).await;
                let mut s = slot.lock().await;
                if s.generation != generation || s.running.is_none() {
                    return;
                }
                let quiet = s.last_used.elapsed();
                if quiet >= idle {
                    let running = s.running.take();
                    drop(s);
                    if let Some(r) = running {
                        info!(
                            pid = r.pid,
                            idle_s = idle.as_secs_f64(),
                            "executor process idle: stopping it"
                        );
                        stop(r).await;
                    }
                    return;
                }
                wait = idle - quiet;
            }
        });
    }

    /// One request to a child (started if needed); a lost child is stopped.
    async fn call(&self, request: &Request) -> Result<Vec<Event>, ChildError> {
        let mut slot = self.slot.lock().await;
        self.ensure(&mut slot).await?;
        let Some(r) = slot.running.as_mut() else {
            return Err(ChildError::Lost("not running".into()));
        };
        let answer = async {
            write_frame(&mut r.stdin, request).await?;
            read_frame::<_, Reply>(&mut r.stdout).await
        }
        .await;
        slot.last_used = Instant::now();
        match answer {
            Ok(Some(Reply::Events(events))) => Ok(events),
            other => {
                let lost = slot.running.take();
                drop(slot);
                let status = match lost {
                    Some(mut r) => {
                        let _ = r.process.start_kill();
                        tokio::time::timeout(EXIT_WAIT, r.process.wait()).await.ok()
                    }
                    None => None,
                };
                Err(ChildError::Lost(format!(
                    "{}; {}",
                    describe(Some(other)),
                    exit_text(status)
                )))
            }
        }
    }

    /// [`Self::call`], and once more on a fresh child when the first one was lost.
    async fn call_again_if_lost(
        &self,
        what: &str,
        request: &Request,
    ) -> Result<Vec<Event>, ChildError> {
        match self.call(request).await {
            Err(ChildError::Lost(e)) => {
                warn!(what, error = %e, "the executor process was lost during the work; retrying it on a new one");
                self.call(request).await
            }
            other => other,
        }
    }

    /// The events that report `work` as failed because of `e`.
    fn failed(&self, work: &Work, e: &ChildError) -> Vec<Event> {
        error!(error = %e, ?work, "work failed: executor process");
        let (server, what) = match work {
            Work::Define { server, why, .. } => (*server, why.clone()),
            Work::Action { server, action } => (*server, action.as_str().to_owned()),
            Work::Teardown { server, why } => (*server, why.clone()),
            Work::Reattach { server, .. } => (*server, "reattach".to_owned()),
        };
        let mut events: Vec<Event> = match work {
            Work::Define { devices, .. } => devices
                .iter()
                .map(|d| {
                    Event::DeviceAttachFailed(DeviceAttachFailed {
                        device_id: d.device_id,
                        host: self.host.clone(),
                        server_id: server,
                        error: format!("{what}: {e}"),
                    })
                })
                .collect(),
            Work::Reattach { device, .. } => vec![Event::DeviceAttachFailed(DeviceAttachFailed {
                device_id: *device,
                host: self.host.clone(),
                server_id: server,
                error: format!("{what}: {e}"),
            })],
            _ => Vec::new(),
        };
        events.push(Event::ServerStateChanged(ServerStateChanged {
            server_id: server,
            host: Some(self.host.clone()),
            state: ServerState::Error,
            reported_by_agent: true,
            detail: format!("{what} failed: {e}"),
        }));
        events
    }
}

impl Hands for ChildExecutor {
    fn host(&self) -> &HostName {
        &self.host
    }

    fn handle<'a>(
        &'a self,
        env: &'a Envelope,
        devices: &'a DeviceMap,
    ) -> BoxFuture<'a, Vec<Event>> {
        Box::pin(async move {
            // Only work for this host starts a child; anything else asks nothing of libvirt.
            let Some(work) = work_for(&self.host, &env.body) else {
                return Vec::new();
            };
            let request = match Request::handle(env, devices) {
                Ok(r) => r,
                Err(e) => return self.failed(&work, &ChildError::Lost(e.to_string())),
            };
            match self.call_again_if_lost(env.body.kind(), &request).await {
                Ok(events) => events,
                Err(e) => self.failed(&work, &e),
            }
        })
    }

    fn reattach_lineage(
        &self,
        lineage: LineageId,
        device: DeviceId,
        info: DeviceInfo,
    ) -> BoxFuture<'_, Vec<Event>> {
        Box::pin(async move {
            let request = Request::ReattachLineage {
                lineage,
                device,
                info,
            };
            match self.call_again_if_lost("reattach", &request).await {
                Ok(events) => events,
                Err(e) => {
                    error!(%lineage, %device, error = %e, "re-attach not carried out: executor process");
                    Vec::new()
                }
            }
        })
    }

    fn resume_after_host_boot<'a>(&'a self, devices: &'a DeviceMap) -> BoxFuture<'a, Vec<Event>> {
        Box::pin(async move {
            let request = Request::ResumeAfterHostBoot {
                devices: device_list(devices),
            };
            match self
                .call_again_if_lost("resume after host boot", &request)
                .await
            {
                Ok(events) => events,
                Err(e) => {
                    error!(error = %e, "domains not resumed after the host reboot: executor process");
                    Vec::new()
                }
            }
        })
    }
}

/// Closes the child's stdin (it exits at the end of its input) and waits for it; kills it when
/// it does not exit in time.
async fn stop(r: Running) {
    let Running {
        mut process,
        stdin,
        stdout,
        pid,
        ..
    } = r;
    drop(stdin);
    drop(stdout);
    match tokio::time::timeout(EXIT_WAIT, process.wait()).await {
        Ok(Ok(status)) if status.success() => {}
        Ok(Ok(status)) => warn!(pid, %status, "the executor process exited with a failure"),
        Ok(Err(e)) => warn!(pid, error = %e, "waiting for the executor process failed"),
        Err(_) => {
            warn!(pid, "the executor process did not exit; killing it");
            let _ = process.kill().await;
        }
    }
}

fn describe(answer: Option<std::io::Result<Option<Reply>>>) -> String {
    match answer {
        None => "no answer in time".into(),
        Some(Ok(None)) => "it closed its output".into(),
        Some(Ok(Some(reply))) => format!("unexpected reply {reply:?}"),
        Some(Err(e)) => format!("pipe: {e}"),
    }
}

fn exit_text(status: Option<std::io::Result<std::process::ExitStatus>>) -> String {
    match status {
        Some(Ok(s)) => format!("exit {s}"),
        Some(Err(e)) => format!("exit unknown: {e}"),
        None => "did not exit in time".into(),
    }
}
