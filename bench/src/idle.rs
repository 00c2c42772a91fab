//! An idle `usbpt agent` (the real binary — `usbpt-agent` once it has executed it, ADR 0016 —,
//! real udev monitor, connected to the bus with its control-plane consumer): on-CPU time over a
//! measured window and resident memory, read from `/proc/PID` (every thread's `schedstat`,
//! `status`, `smaps`, `smaps_rollup`); and its libvirt executor process while that is alive
//! (the agent starts it once to check the hypervisor, and it stops when idle).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::report::Figure;
use crate::target::Target;

/// Per thread: nanoseconds on CPU (`schedstat`) and context switches.
fn threads(pid: u32) -> Result<BTreeMap<String, (u64, u64)>> {
    let mut out = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?;
        let path = task.path();
        let ns = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        let switches = std::fs::read_to_string(path.join("status"))
            .map(|s| {
                s.lines()
                    .filter(|l| l.contains("ctxt_switches"))
                    .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                    .sum::<u64>()
            })
            .unwrap_or(0);
        out.insert(
            task.file_name().to_string_lossy().into_owned(),
            (ns, switches),
        );
    }
    Ok(out)
}

/// CPU nanoseconds and context switches between two per-thread readings: threads present at
/// both count their difference, threads born in between their whole total (a thread that
/// ended in between loses its share: the figure is a lower bound by at most that).
fn delta(
    before: &BTreeMap<String, (u64, u64)>,
    after: &BTreeMap<String, (u64, u64)>,
) -> (u64, u64) {
    after.iter().fold((0, 0), |(ns, sw), (tid, (a_ns, a_sw))| {
        let (b_ns, b_sw) = before.get(tid).copied().unwrap_or((0, 0));
        (
            ns + a_ns.saturating_sub(b_ns),
            sw + a_sw.saturating_sub(b_sw),
        )
    })
}

/// `VmRSS` and `VmHWM` in KiB, and the thread count.
fn memory(pid: u32) -> Result<(u64, u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:"), field("Threads:")))
}

/// Proportional set size in KiB (`/proc/PID/smaps_rollup`): shared pages divided among the
/// processes that map them.
fn pss(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    Ok(s.lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

/// The process ids of `pid`'s children.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Resident KiB by kind of mapping, from `/proc/PID/smaps`.
struct ResidentSplit {
    anon: u64,
    binary: u64,
    libraries: u64,
}

fn resident_split(pid: u32) -> Result<ResidentSplit> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    // The binary the process runs now (`usbpt agent` executes `usbpt-agent`).
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
    let mut split = ResidentSplit {
        anon: 0,
        binary: 0,
        libraries: 0,
    };
    let mut path = String::new();
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: range, perms, offset, dev, inode, [path].
            path = words.nth(4).unwrap_or_default().to_owned();
        } else if first == "Rss:" {
            let kib: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            if path.is_empty() || path.starts_with('[') {
                split.anon += kib;
            } else if Path::new(&path) == exe {
                split.binary += kib;
            } else {
                split.libraries += kib;
            }
        }
    }
    Ok(split)
}

pub async fn agent_idle(target: &Target, usbpt: &Path, window: Duration) -> Result<Vec<Figure>> {
    let _bus = target.fresh_bus().await?;
    let dir = tempfile::Builder::new().prefix("usbpt-bench-").tempdir()?;
    let boot = dir.path().join("boot_id");
    std::fs::write(&boot, "bench-boot\n")?;
    let mut child = Command::new(usbpt)
        .args([
            "agent",
            "--host",
            "bench-idle",
            "--hypervisor",
            "test:///default",
            // The executor process the agent starts at start-up stops after this long idle.
            "--executor-idle",
            "2",
        ])
        .arg("--boot-id-file")
        .arg(&boot)
        // The URL in the environment, not the arguments: `ps` shows arguments, and an operator's
        // URL may carry user:password.
        .env("NATS_URL", target.url())
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("USBPT_LOG", "warn")
        // The bench measures against its own private server (no authentication) or the one it
        // is given; it does not judge that server's security.
        .env("USBPT_INSECURE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawn {} agent", usbpt.display()))?;
    let pid = child.id().context("the agent exited at once")?;
    let mut lines = BufReader::new(child.stdout.take().context("agent stdout")?).lines();
    // Idle means: started, reconciled and everything it queued is in the stream.
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if line.contains(r#""progress":"drained""#) {
                return Ok(());
            }
        }
        bail!("usbpt agent exited before it drained its outbox")
    })
    .await
    .context("usbpt agent did not drain its outbox within 60 s")??;
    let drain = tokio::spawn(async move {
        let mut n = 0u64;
        while let Ok(Some(_)) = lines.next_line().await {
            n += 1;
        }
        n
    });

    // The libvirt executor process, alive from the start-up check until it has been idle.
    let executor = children(pid).into_iter().next();
    let executor_mem = match executor {
        Some(c) => Some((memory(c)?.0, pss(c)?)),
        None => None,
    };
    let gone_by = Instant::now() + Duration::from_secs(30);
    while executor.is_some_and(|c| Path::new(&format!("/proc/{c}")).exists()) {
        if Instant::now() > gone_by {
            bail!("the agent's executor process did not stop when idle");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let before = threads(pid)?;
    let t0 = Instant::now();
    // A measured window: the time itself is what is measured.
    tokio::time::sleep(window).await;
    let (ns, switches) = delta(&before, &threads(pid)?);
    let secs = t0.elapsed().as_secs_f64();
    let (rss, hwm, threads) = memory(pid)?;
    let split = resident_split(pid)?;
    let pss_kib = pss(pid)?;
    let binary = std::fs::read_link(format!("/proc/{pid}/exe"))?;
    let binary = binary
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let children_now = children(pid).len();
    if let Some(status) = child.try_wait()? {
        bail!("usbpt agent exited during the idle window: {status}");
    }
    child.kill().await?;
    let _ = drain.await;

    let on_cpu_ms = ns as f64 / 1e6;
    let mut figures = vec![
        Figure::new(
            "agent_idle_cpu",
            format!("agent idle: CPU over {:.0} s (usbpt agent)", secs),
            1,
        )
        .value(100.0 * on_cpu_ms / 1000.0 / secs, "% core")
        .note(format!(
            "real udev monitor, bus connection and control consumer; {on_cpu_ms:.1} ms on CPU in {secs:.1} s; {:.2} context switches/s; {threads} threads",
            switches as f64 / secs
        )),
        Figure::new("agent_rss", "agent idle: resident memory (VmRSS)", 1)
            .value(rss as f64 / 1024.0, "MiB")
            .note(format!(
                "{binary}; PSS {:.1} MiB; peak (VmHWM) {:.1} MiB; resident: {:.1} MiB anonymous (heap, stacks), {:.1} MiB the {binary} binary's pages, {:.1} MiB shared libraries; {children_now} child processes",
                pss_kib as f64 / 1024.0,
                hwm as f64 / 1024.0,
                split.anon as f64 / 1024.0,
                split.binary as f64 / 1024.0,
                split.libraries as f64 / 1024.0,
            ))
            .floor("≤ 16 MiB", rss as f64 / 1024.0 <= 16.0),
    ];
    if let Some((rss, pss)) = executor_mem {
        figures.push(
            Figure::new(
                "agent_executor_rss",
                "agent's libvirt executor process while alive (VmRSS)",
                1,
            )
            .value(rss as f64 / 1024.0, "MiB")
            .note(format!(
                "usbpt agent-executor connected to libvirt (test driver), PSS {:.1} MiB; started for libvirt work and stopped after --executor-idle (here 2 s) without any",
                pss as f64 / 1024.0
            )),
        );
    }
    Ok(figures)
}
