//! The projector process SIGKILLed at random points of a 50,000-event load, restarted each
//! time; the final view equals a clean replay (`usbpt replay --verify`). Real nats-server, real
//! redb file, the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod projector_support;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use projector_support::usbpt;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tokio::sync::watch;
use usbpt_projector::workload::{publish_all, publish_raw, Workload};
use usbpt_testkit::TestNats;

const EVENTS: usize = 50_000;
const KILLS: usize = 5;

/// A `usbpt projector` whose progress (the last applied sequence it logs per batch) is
/// followed from its stderr.
struct Running {
    child: Child,
    applied: watch::Receiver<u64>,
    /// The sequence it said it resumes after (`resume_after=`), once it has said it.
    resumed: watch::Receiver<Option<u64>>,
}

fn spawn_projector(nats: &str, data: &Path, extra: &[&str]) -> Result<Running> {
    let mut child = usbpt()
        .args(["projector", "--batch", "500"])
        .args(extra)
        .env("NATS_URL", nats)
        .env("USBPT_DATA_DIR", data)
        .env("USBPT_LOG", "usbpt_projector=debug")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawn usbpt projector")?;
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = watch::channel(0u64);
    let (resumed_tx, resumed) = watch::channel(None);
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let line = strip_ansi(&line);
            if let Some(n) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("resume_after="))
                .and_then(|n| n.parse::<u64>().ok())
            {
                resumed_tx.send_replace(Some(n));
            }
            let seq = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("last_applied="))
                .or_else(|| {
                    line.split_whitespace()
                        .find_map(|w| w.strip_prefix("resume_after="))
                })
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(seq) = seq {
                tx.send_replace(seq);
            } else if !line.contains("DEBUG") {
                eprintln!("[projector] {line}");
            }
        }
    });
    Ok(Running {
        child,
        applied: rx,
        resumed,
    })
}

/// Log lines may carry terminal colours; the fields are what matters.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Running {
    async fn reach(&mut self, seq: u64) -> Result<u64> {
        let reached = tokio::time::timeout(
            Duration::from_secs(120),
            self.applied.wait_for(|a| *a >= seq),
        )
        .await
        .with_context(|| format!("projector did not reach {seq}"))?;
        match reached {
            Ok(v) => Ok(*v),
            Err(_) => bail!("projector exited before reaching {seq}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_at_random_points_of_a_50k_load_the_view_equals_a_clean_replay() -> Result<()> {
    let runs = crash_runs(&[]).await?;
    // Every commit was durable: each run resumes where the killed one had got to, or later
    // (a commit can land between the log line and the kill).
    for (killed, resumed) in runs.windows(2).map(|w| (w[0].0, w[1].1)) {
        assert!(
            resumed >= killed,
            "resumed after {resumed}, killed at {killed}"
        );
    }
    Ok(())
}

/// The same with commits made durable only within 60 s (`--view-sync-ms`, ADR 0015): a kill
/// loses the commits that were visible but not yet durable, and the restarted projector folds
/// them again from the stream; the view still ends equal to a clean replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_lazy_view_sync_a_sigkill_refolds_what_was_not_durable_and_nothing_else() -> Result<()>
{
    let runs = crash_runs(&["--view-sync-ms", "60000"]).await?;
    assert!(
        runs.windows(2).any(|w| w[1].1 < w[0].0),
        "no restart went back before where the killed run had got to: {runs:?}"
    );
    Ok(())
}

/// Runs the projector over a 50,000-event load, SIGKILLing it at random points and restarting
/// it, then checks the final view against a clean replay. Returns, per run, where it was killed
/// (the last applied sequence it logged) and where it resumed.
async fn crash_runs(extra: &[&str]) -> Result<Vec<(u64, u64)>> {
    let nats = TestNats::start().await?;
    let bus = nats.bus().await?;
    let data = tempfile::tempdir()?;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    eprintln!("kill points seed: {seed}");

    // The load: 50,000 events (plus garbage every 10,000, quarantined) published while the
    // projector runs and dies.
    let publisher = {
        let bus = bus.clone();
        tokio::spawn(async move {
            let mut workload = Workload::new(seed, 40, 8);
            let mut last = 0;
            for _ in 0..EVENTS / 10_000 {
                publish_all(&bus, workload.by_ref().take(10_000), 64).await?;
                last = publish_raw(
                    &bus,
                    "usbpt.evt.host.host-00001.agent",
                    b"\x00garbage".to_vec(),
                )
                .await?;
            }
            anyhow::Ok(last)
        })
    };
    let total = (EVENTS + EVENTS / 10_000) as u64;

    // Kill points: random, increasing, spread over the load.
    let mut rng = seed | 1;
    let mut points: Vec<u64> = (0..KILLS)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            1 + rng % (total - 1)
        })
        .collect();
    points.sort_unstable();
    eprintln!("kill points: {points:?}");

    let mut runs = Vec::new();
    for point in points {
        let mut p = spawn_projector(&nats.url(), data.path(), extra)?;
        let at = p.reach(point).await?;
        let resumed = p.resumed.borrow().context("no resume_after logged")?;
        // Not a synchronisation: a random 0-20 ms more, so the kill lands anywhere in the
        // next fetch, fold, commit or ack rather than right after a log line.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        tokio::time::sleep(Duration::from_micros(rng % 20_000)).await;
        p.child.start_kill()?; // SIGKILL
        p.child.wait().await?;
        runs.push((at, resumed));
    }
    eprintln!("(killed after, had resumed after) per run: {runs:?}");
    let last = publisher.await??;
    assert_eq!(last, total);

    // A last run catches up; it is stopped cleanly so the file can be opened read-only.
    let mut p = spawn_projector(&nats.url(), data.path(), extra)?;
    p.reach(last).await?;
    let resumed = p.resumed.borrow().context("no resume_after logged")?;
    runs.push((last, resumed));
    let pid = p.child.id().context("pid")?;
    let term = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await?;
    assert!(term.success());
    let status = tokio::time::timeout(Duration::from_secs(30), p.child.wait()).await??;
    assert!(status.success(), "projector exit: {status}");

    let out = usbpt()
        .args(["replay", "--verify"])
        .env("NATS_URL", nats.url())
        .env("USBPT_DATA_DIR", data.path())
        .output()
        .await?;
    let (stdout, stderr) = (
        String::from_utf8(out.stdout)?,
        String::from_utf8(out.stderr)?,
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.starts_with(&format!(
            "verified: the live view at sequence {last} equals"
        )),
        "{stdout}"
    );
    Ok(runs)
}
