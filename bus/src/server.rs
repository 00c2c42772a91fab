//! A private `nats-server` with JetStream on loopback: what `usbpt up` and `usbpt demo` run when
//! no `--nats` is given, and what every integration test starts. It can be stopped gracefully,
//! killed with SIGKILL and restarted on the same store and port (fault tests).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

/// The environment variable that names the nats-server binary to run.
pub const BINARY_ENV: &str = "USBPT_NATS_SERVER";

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("nats-server not found: set {BINARY_ENV}, put it on PATH, or run scripts/setup (it installs the pinned version under .tools/bin)")]
    NotFound,
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("nats-server did not become ready within {0:?}; its log: {1}")]
    NotReady(Duration, String),
    #[error("nats-server exited during start-up; its log: {0}")]
    Exited(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServerError {
    let what = what.into();
    move |source| ServerError::Io { what, source }
}

/// Finds nats-server: `$USBPT_NATS_SERVER`, then `PATH`, then `.tools/bin/nats-server` in the
/// current directory or any ancestor of it or of the running executable (where `scripts/setup`
/// installs it).
pub fn locate_binary() -> Result<PathBuf, ServerError> {
    if let Some(p) = std::env::var_os(BINARY_ENV) {
        return Ok(PathBuf::from(p));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    let mut roots = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.push(exe);
    }
    for root in roots {
        for dir in root.ancestors() {
            let candidate = dir.join(".tools/bin/nats-server");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err(ServerError::NotFound)
}

/// How to run the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Holds `jetstream/` (the store), the generated config and the log.
    pub dir: PathBuf,
    /// `None`: a free port chosen by the server (read back from its log).
    pub port: Option<u16>,
    /// `sync_interval: always` (fsync every write) instead of the default periodic fsync.
    pub sync_always: bool,
    /// Server name (cluster members must differ).
    pub name: String,
    /// Cluster membership, for R3 tests and deployments.
    pub cluster: Option<ClusterConfig>,
    /// The authorization block to include (`CredsDir::write_auth_conf`): with it the server
    /// refuses anonymous clients and enforces each identity's permissions. `None`: no auth
    /// (tests of other things).
    pub auth: Option<PathBuf>,
    /// TLS for client connections (PEM files): clients must use it, and must present a
    /// certificate signed by `ca` when it is given.
    pub tls: Option<ServerTls>,
}

/// The server's TLS files.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Verify client certificates against this CA.
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub name: String,
    pub port: u16,
    /// Other members' cluster ports on 127.0.0.1.
    pub routes: Vec<u16>,
}

impl ServerConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            port: None,
            sync_always: false,
            name: "usbpt".to_owned(),
            cluster: None,
            auth: None,
            tls: None,
        }
    }

    /// Where the running server writes its process id (`usbpt creds` signals it to reload).
    pub fn pid_file(dir: &Path) -> PathBuf {
        dir.join("nats-server.pid")
    }

    fn render(&self, port: Option<u16>) -> String {
        let store = self.dir.join("jetstream");
        let mut out = String::new();
        out.push_str(&format!("server_name: {:?}\n", self.name));
        out.push_str(&format!(
            "listen: \"127.0.0.1:{}\"\n",
            port.map_or(-1, i32::from)
        ));
        out.push_str("max_payload: 1048576\n");
        out.push_str(&format!(
            "pid_file: {:?}\n",
            Self::pid_file(&self.dir).display().to_string()
        ));
        if let Some(auth) = &self.auth {
            // nats-server resolves includes relative to the config file's directory only.
            let rel = relative_to(&self.dir, auth);
            out.push_str(&format!("include {:?}\n", rel.display().to_string()));
        }
        if let Some(tls) = &self.tls {
            out.push_str("tls {\n");
            out.push_str(&format!(
                "  cert_file: {:?}\n",
                tls.cert.display().to_string()
            ));
            out.push_str(&format!(
                "  key_file: {:?}\n",
                tls.key.display().to_string()
            ));
            if let Some(ca) = &tls.ca {
                out.push_str(&format!("  ca_file: {:?}\n", ca.display().to_string()));
                out.push_str("  verify: true\n");
            }
            out.push_str("  timeout: 5\n");
            out.push_str("}\n");
        }
        out.push_str("jetstream {\n");
        out.push_str(&format!("  store_dir: {:?}\n", store.display().to_string()));
        if self.sync_always {
            out.push_str("  sync_interval: always\n");
        }
        out.push_str("}\n");
        if let Some(c) = &self.cluster {
            out.push_str("cluster {\n");
            out.push_str(&format!("  name: {:?}\n", c.name));
            out.push_str(&format!("  listen: \"127.0.0.1:{}\"\n", c.port));
            let routes: Vec<String> = c
                .routes
                .iter()
                .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
                .collect();
            out.push_str(&format!("  routes: [{}]\n", routes.join(", ")));
            out.push_str("}\n");
        }
        out
    }
}

/// `to` as a path relative to the directory `from` (both made absolute first).
fn relative_to(from: &Path, to: &Path) -> PathBuf {
    let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let (from, to) = (abs(from), abs(to));
    let common = from
        .components()
        .zip(to.components())
        .take_while(|(a, b)| a == b)
        .count();
    let mut rel = PathBuf::new();
    for _ in from.components().skip(common) {
        rel.push("..");
    }
    for c in to.components().skip(common) {
        rel.push(c);
    }
    rel
}

/// A running (or stopped) nats-server child process. Killed when dropped.
#[derive(Debug)]
pub struct NatsServer {
    config: ServerConfig,
    binary: PathBuf,
    child: Option<Child>,
    port: u16,
}

const READY_TIMEOUT: Duration = Duration::from_secs(30);

impl NatsServer {
    /// Starts the server and returns once it logs "Server is ready".
    pub async fn start(config: ServerConfig) -> Result<Self, ServerError> {
        let binary = locate_binary()?;
        crate::auth::private_dir(&config.dir).map_err(|e| ServerError::Io {
            what: format!("create {}", config.dir.display()),
            source: std::io::Error::other(e.to_string()),
        })?;
        let mut server = Self {
            config,
            binary,
            child: None,
            port: 0,
        };
        server.launch().await?;
        Ok(server)
    }

    async fn launch(&mut self) -> Result<(), ServerError> {
        let fixed = (self.port != 0).then_some(self.port).or(self.config.port);
        let conf_path = self.config.dir.join("nats-server.conf");
        crate::auth::write_private(&conf_path, self.config.render(fixed).as_bytes()).map_err(
            |e| ServerError::Io {
                what: format!("write {}", conf_path.display()),
                source: std::io::Error::other(e.to_string()),
            },
        )?;
        let log_path = self.config.dir.join("nats-server.log");
        let mut child = Command::new(&self.binary)
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(io(format!("run {}", self.binary.display())))?;
        let stderr = child.stderr.take().ok_or_else(|| ServerError::Io {
            what: "read nats-server's stderr".into(),
            source: std::io::Error::other("no pipe"),
        })?;
        let (ready_tx, ready_rx) = oneshot::channel();
        tokio::spawn(pump_log(stderr, log_path.clone(), ready_tx));
        let port = match tokio::time::timeout(READY_TIMEOUT, ready_rx).await {
            Ok(Ok(port)) => port,
            Ok(Err(_)) => {
                let _ = child.wait().await;
                return Err(ServerError::Exited(tail(&log_path).await));
            }
            Err(_) => {
                let _ = child.start_kill();
                return Err(ServerError::NotReady(READY_TIMEOUT, tail(&log_path).await));
            }
        };
        self.port = port;
        self.child = Some(child);
        Ok(())
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn dir(&self) -> &Path {
        &self.config.dir
    }
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
    /// The server's process id while it runs (for measuring its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Re-reads the configuration (SIGHUP): new or revoked identities take effect.
    pub fn reload(&self) -> Result<(), ServerError> {
        if let Some(pid) = self.pid().and_then(|p| i32::try_from(p).ok()) {
            kill(Pid::from_raw(pid), Signal::SIGHUP).map_err(|e| ServerError::Io {
                what: "signal nats-server to reload".into(),
                source: std::io::Error::from_raw_os_error(e as i32),
            })?;
        }
        Ok(())
    }

    /// Graceful stop (SIGTERM), waiting for the process to exit.
    pub async fn stop(&mut self) -> Result<(), ServerError> {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            match tokio::time::timeout(Duration::from_secs(20), child.wait()).await {
                Ok(r) => {
                    r.map_err(io("wait for nats-server"))?;
                }
                Err(_) => {
                    let _ = child.kill().await;
                }
            }
        }
        Ok(())
    }

    /// SIGKILL, as a crash or power cut would stop it, and reap it.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts it again on the same store and port.
    pub async fn restart(&mut self) -> Result<(), ServerError> {
        self.kill().await;
        self.launch().await
    }
}

/// Copies the server's log to `log_path` and reports the client port once it is ready.
async fn pump_log(
    stderr: tokio::process::ChildStderr,
    log_path: PathBuf,
    ready: oneshot::Sender<u16>,
) {
    let mut ready = Some(ready);
    let mut port = None;
    let mut lines = BufReader::new(stderr).lines();
    let mut log = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .await
        .ok();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(f) = log.as_mut() {
            let _ = f.write_all(line.as_bytes()).await;
            let _ = f.write_all(b"\n").await;
            let _ = f.flush().await;
        }
        if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
            port = rest.rsplit(':').next().and_then(|p| p.trim().parse().ok());
        }
        if line.contains("Server is ready") {
            if let (Some(tx), Some(p)) = (ready.take(), port) {
                let _ = tx.send(p);
            }
        }
    }
}

async fn tail(path: &Path) -> String {
    let text = tokio::fs::read_to_string(path).await.unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Asks the nats-server whose store is under `dir` to reload its configuration (SIGHUP to the
/// process in its pid file): how `usbpt creds add-host`/`revoke` take effect on a running
/// `usbpt up`. `Ok(false)` when no server runs there.
pub fn signal_reload(dir: &Path) -> Result<bool, ServerError> {
    let Ok(text) = std::fs::read_to_string(ServerConfig::pid_file(dir)) else {
        return Ok(false);
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return Ok(false);
    };
    match kill(Pid::from_raw(pid), Signal::SIGHUP) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::ESRCH) => Ok(false),
        Err(e) => Err(ServerError::Io {
            what: format!("signal nats-server {pid} to reload"),
            source: std::io::Error::from_raw_os_error(e as i32),
        }),
    }
}
