//! The config file as an operator meets it (ADR 0009): `usbpt config check` and `config show`
//! on real files, precedence flag > env > file > default, `--log-format json`, completions and
//! man pages, and systemd readiness (`READY=1` on `$NOTIFY_SOCKET`) from a real `usbpt projector`
//! on a real nats-server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::Result;

/// The binary with a clean environment for everything the config file could also set.
fn usbpt() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_usbpt"));
    for v in [
        "USBPT_CONFIG",
        "NATS_URL",
        "NATS_CREDS",
        "USBPT_INSECURE",
        "USBPT_LOG",
        "USBPT_LOG_FORMAT",
        "USBPT_DATA_DIR",
        "USBPT_TLS_CA",
        "NOTIFY_SOCKET",
    ] {
        c.env_remove(v);
    }
    c
}

fn stdout(c: &mut Command) -> (bool, String, String) {
    let out = c.output().expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_refuses_an_unknown_key_naming_it_and_its_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("usbpt.toml");
    std::fs::write(
        &file,
        "[agent]\nhost = \"hv-01\"\nhypervisr = \"qemu:///system\"\n",
    )?;
    let (ok, _, err) = stdout(usbpt().arg("--config").arg(&file).args(["config", "check"]));
    assert!(!ok);
    assert!(err.contains("hypervisr"), "{err}");
    assert!(err.contains("line 3"), "{err}");
    Ok(())
}

#[test]
fn check_names_a_missing_file_by_its_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("usbpt.toml");
    std::fs::write(&file, "[nats]\ncreds = \"/nonexistent/agent.nk\"\n")?;
    let (ok, _, err) = stdout(usbpt().arg("--config").arg(&file).args(["config", "check"]));
    assert!(!ok);
    assert!(err.contains("nats.creds"), "{err}");

    let filter = dir.path().join("filter.toml");
    std::fs::write(&filter, "[[rule]]\naction = \"allow\"\nvendor = \"1050\"\n")?;
    std::fs::write(
        &file,
        format!(
            "[agent]\nhost = \"hv-01\"\nfilter = {:?}\n",
            filter.display().to_string()
        ),
    )?;
    let (ok, out, err) = stdout(usbpt().env("USBPT_CONFIG", &file).args(["config", "check"]));
    assert!(ok, "{err}");
    assert!(out.contains("ok (2 keys set)"), "{out}");
    Ok(())
}

#[test]
fn show_resolves_flag_over_env_over_file_over_default_and_redacts_passwords() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("usbpt.toml");
    std::fs::write(
        &file,
        "data_dir = \"/srv/usbpt\"\n\
         [nats]\nurls = [\"nats://op:hunter2@127.0.0.1:4222\", \"nats://127.0.0.1:4223\"]\n\
         tls.ca = \"/etc/usbpt/ca.pem\"\n\
         [commands]\ngrace = 30\n",
    )?;
    let (ok, out, err) = stdout(
        usbpt()
            .arg("--config")
            .arg(&file)
            .env("USBPT_TLS_CA", "/env/ca.pem")
            .args(["config", "show", "--data-dir", "/flag/data"]),
    );
    assert!(ok, "{err}");
    assert!(out.contains("data_dir = \"/flag/data\"  # flag"), "{out}");
    assert!(
        out.contains("ca = \"/env/ca.pem\"  # env USBPT_TLS_CA"),
        "{out}"
    );
    assert!(out.contains("grace = 30  # file"), "{out}");
    assert!(out.contains("concurrency = 32  # default"), "{out}");
    assert!(!out.contains("hunter2"), "{out}");
    assert!(out.contains("nats://127.0.0.1:4223"), "{out}");
    // What it prints is itself a valid config file.
    let reread = dir.path().join("shown.toml");
    std::fs::write(&reread, &out)?;
    let (ok, again, err) = stdout(
        usbpt()
            .arg("--config")
            .arg(&reread)
            .args(["config", "show"]),
    );
    assert!(ok, "{err}");
    assert!(again.contains("grace = 30  # file"), "{again}");
    Ok(())
}

#[test]
fn a_named_config_file_must_exist() {
    let (ok, _, err) = stdout(usbpt().args(["--config", "/nonexistent/usbpt.toml", "devices"]));
    assert!(!ok);
    assert!(err.contains("/nonexistent/usbpt.toml"), "{err}");
}

#[test]
fn completions_and_man_pages() -> Result<()> {
    for shell in ["bash", "zsh", "fish"] {
        let (ok, out, err) = stdout(usbpt().args(["completions", shell]));
        assert!(ok, "{shell}: {err}");
        assert!(out.contains("usbpt"), "{shell}");
        assert!(out.contains("config"), "{shell}: subcommands are completed");
    }
    let dir = tempfile::tempdir()?;
    let (ok, _, err) = stdout(usbpt().arg("manpages").arg(dir.path()));
    assert!(ok, "{err}");
    let main = std::fs::read_to_string(dir.path().join("usbpt.1"))?;
    assert!(main.starts_with(".ie"), "{main:.80}");
    assert!(main.contains("usbpt\\-agent(1)") || main.contains("usbpt-agent"));
    let agent = std::fs::read_to_string(dir.path().join("usbpt-agent.1"))?;
    assert!(agent.contains("\\-\\-host"), "{agent:.400}");
    assert!(dir.path().join("usbpt-config-check.1").is_file());
    Ok(())
}

/// `--log-format json`: the first log line of a starting agent is one JSON object.
#[test]
fn log_format_json_writes_one_object_per_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut child = usbpt()
        .args(["--log-format", "json", "-v", "--insecure"])
        .args(["--nats", "nats://127.0.0.1:9", "--data-dir"])
        .arg(dir.path())
        .args([
            "agent",
            "--host",
            "hv-json",
            "--hypervisor",
            "test:///default",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stderr.take().expect("stderr")).read_line(&mut line)?;
    let _ = child.kill();
    let _ = child.wait();
    let v: serde_json::Value =
        serde_json::from_str(&line).map_err(|e| anyhow::anyhow!("{e}: {line}"))?;
    assert_eq!(v["level"], "INFO", "{line}");
    assert_eq!(v["fields"]["message"], "starting the host agent", "{line}");
    assert!(v["timestamp"].is_string(), "{line}");
    Ok(())
}

/// Under `Type=notify`, `usbpt projector` sends `READY=1` once it runs: read from a real
/// datagram socket given as `$NOTIFY_SOCKET`, as systemd would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projector_notifies_systemd_when_ready() -> Result<()> {
    let nats = usbpt_testkit::TestNats::start().await?;
    let dir = tempfile::tempdir()?;
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path)?;
    sock.set_read_timeout(Some(std::time::Duration::from_secs(60)))?;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_usbpt"))
        .env_remove("USBPT_CONFIG")
        .env("NOTIFY_SOCKET", &sock_path)
        .args(["--insecure", "--nats", &nats.url(), "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("projector")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let msg = tokio::task::spawn_blocking(move || {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf)?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
    .await??;
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    assert!(msg.contains("STATUS=projector running"), "{msg}");
    child.kill().await?;
    Ok(())
}
