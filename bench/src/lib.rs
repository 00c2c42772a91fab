//! `usbpt bench`: each usbpt figure is measured in the same run as the raw limit of the engine
//! underneath it (JetStream publish and read, redb batched inserts, the codec), and printed as a
//! ratio, so a reader sees how much of the engine usbpt leaves on the table.
//!
//! [`run`] measures, in order: the codec and envelope sizes; JetStream publish (raw and the
//! agent's outbox drain); hotplug → view latency through the real agent and projector, and the
//! query path (snapshot and HTTP); claims with competing command handlers; scheduling latency
//! over a 10,000-host view; projector fold and full replay of 1,000,000 events against raw
//! read + insert; an idle agent's CPU and memory. Against a private nats-server with default
//! fsync, and again with `sync_interval: always` where the server's fsync matters; or against
//! the operator's server (`--nats`).

pub mod claims;
pub mod codec;
pub mod fold;
pub mod hotplug;
pub mod idle;
pub mod publish;
pub mod raw;
pub mod report;
pub mod sched;
pub mod stats;
pub mod target;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;

pub use report::{Figure, Report};
pub use target::Target;

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// A CI smoke run: small counts, every figure, well under a minute.
    pub quick: bool,
    /// The operator's server; `None`: private servers in temp dirs.
    pub nats: Option<String>,
    /// The `usbpt` binary, for the idle-agent figures (skipped when `None`).
    pub usbpt: Option<PathBuf>,
}

/// How much of each thing is measured.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub codec_iterations: usize,
    pub raw_publish: usize,
    pub raw_inflight: usize,
    pub raw_fenced: usize,
    pub agent_publish: usize,
    pub hotplug: usize,
    pub raw_hotplug: usize,
    /// Events for the `sync_interval: always` server (its fsync per message is slow).
    pub sync_always_share: f64,
    pub claim_devices: usize,
    pub claim_boots: usize,
    pub sched_hosts: usize,
    pub sched_min: usize,
    pub sched_budget: Duration,
    pub fold_events: usize,
    pub idle_window: Duration,
}

impl Sizes {
    pub fn full() -> Self {
        Self {
            codec_iterations: 200_000,
            raw_publish: 10_000,
            raw_inflight: 200_000,
            raw_fenced: 10_000,
            agent_publish: 10_000,
            hotplug: 10_000,
            raw_hotplug: 10_000,
            sync_always_share: 1.0,
            claim_devices: 200,
            claim_boots: 400,
            sched_hosts: 10_000,
            sched_min: 200,
            sched_budget: Duration::from_secs(20),
            fold_events: 1_000_000,
            idle_window: Duration::from_secs(60),
        }
    }
    pub fn quick() -> Self {
        Self {
            codec_iterations: 10_000,
            raw_publish: 500,
            raw_inflight: 5_000,
            raw_fenced: 500,
            agent_publish: 300,
            hotplug: 200,
            raw_hotplug: 200,
            sync_always_share: 0.5,
            claim_devices: 12,
            claim_boots: 24,
            sched_hosts: 200,
            sched_min: 20,
            sched_budget: Duration::from_millis(500),
            fold_events: 5_000,
            idle_window: Duration::from_secs(2),
        }
    }
}

/// Runs every measurement and returns the report. `progress` hears what is being measured.
pub async fn run(options: &Options, mut progress: impl FnMut(&str)) -> Result<Report> {
    let started = Instant::now();
    let sizes = if options.quick {
        Sizes::quick()
    } else {
        Sizes::full()
    };
    let mut report = Report {
        usbpt_version: env!("CARGO_PKG_VERSION").to_owned(),
        mode: if options.quick { "quick" } else { "full" }.to_owned(),
        machine: report::Machine::detect(),
        ..Report::default()
    };
    let mut targets = Vec::new();
    match &options.nats {
        Some(url) => targets.push(Target::external(url).await?),
        None => {
            targets.push(Target::private(false).await?);
            targets.push(Target::private(true).await?);
        }
    }
    report.nats_servers = targets.iter().map(|t| t.description.clone()).collect();
    let result = measure(&mut report, &targets, &sizes, options, &mut progress).await;
    for t in targets {
        if !t.is_private() {
            t.cleanup().await?;
        }
        t.stop().await?;
    }
    result?;
    report.elapsed_s = started.elapsed().as_secs_f64();
    Ok(report)
}

async fn measure(
    report: &mut Report,
    targets: &[Target],
    sizes: &Sizes,
    options: &Options,
    progress: &mut impl FnMut(&str),
) -> Result<()> {
    progress("codec and envelope sizes");
    report.extend(codec::figures(sizes.codec_iterations)?);

    for (i, t) in targets.iter().enumerate() {
        let share = if t.suffix.is_empty() {
            1.0
        } else {
            sizes.sync_always_share
        };
        let n = |x: usize| ((x as f64 * share) as usize).max(10);
        let tag = |f: Figure| f.suffixed(t.suffix, "fsync always");
        let key = |k: &str| {
            if t.suffix.is_empty() {
                k.to_owned()
            } else {
                format!("{k}.{}", t.suffix)
            }
        };

        progress(&format!(
            "agent publish ({}; {})",
            n(sizes.agent_publish),
            t.label
        ));
        let (agent, size) = publish::agent_publish(t, n(sizes.agent_publish)).await?;
        report.push(tag(agent));
        progress(&format!("raw JetStream publish ({})", t.label));
        report.push(tag(raw::publish_each_ack(
            t.url(),
            n(sizes.raw_publish),
            size,
        )
        .await?));
        // With an fsync per message, 1,000 in flight is no faster than a tenth of the count.
        let inflight = if t.suffix.is_empty() {
            sizes.raw_inflight
        } else {
            n(sizes.raw_inflight / 10)
        };
        report.push(tag(raw::publish_async(t.url(), inflight, size, 1000).await?));
        report.compare_rate(&key("agent_publish"), &key("raw_publish_each_ack"));

        progress(&format!(
            "hotplug → view ({} events; {})",
            n(sizes.hotplug),
            t.label
        ));
        let h = hotplug::hotplug_to_view(t, n(sizes.hotplug), i == 0).await?;
        for f in h.figures {
            report.push(if f.key == "hotplug_to_view" {
                tag(f)
            } else {
                f
            });
        }
        progress(&format!("raw engine path under a hotplug ({})", t.label));
        report.push(tag(
            raw::hotplug_path(t.url(), n(sizes.raw_hotplug), size).await?
        ));
        report.compare_latency(&key("hotplug_to_view"), &key("raw_hotplug_path"));
        if i == 0 {
            report.compare_latency("api_get_device", "view_device_lookup");
        }

        if i == 0 {
            progress(&format!(
                "claims: 4 handlers, {} boots for {} devices",
                sizes.claim_boots, sizes.claim_devices
            ));
            report.extend(claims::claims(t, 4, sizes.claim_devices, sizes.claim_boots).await?);
            report.push(raw::fenced_publish(t.url(), sizes.raw_fenced, size).await?);
            report.compare_rate("claims", "raw_fenced_publish");
        }
    }

    progress(&format!(
        "scheduling over {} hosts × 16 devices",
        sizes.sched_hosts
    ));
    let (hosts, min, budget) = (sizes.sched_hosts, sizes.sched_min, sizes.sched_budget);
    let figures =
        tokio::task::spawn_blocking(move || sched::scheduling(hosts, 16, min, budget)).await??;
    report.extend(figures);
    report.compare_latency("schedule_decide", "raw_index_scan");
    report.compare_latency("schedule_query", "raw_index_scan");

    let main = &targets[0];
    progress(&format!(
        "projector fold and full replay of {} events",
        sizes.fold_events
    ));
    report.extend(fold::fold_and_replay(main, sizes.fold_events).await?);
    report.compare_rate("fold_live", "raw_read_insert");
    report.compare_rate("replay", "raw_read_insert_nosync");
    report.compare_rate("fold_apply", "raw_redb_insert");
    if let Some(f) = report.figures.iter_mut().find(|f| f.key == "fold_live") {
        let share = f.vs_raw.as_ref().map_or(0.0, |r| r.ratio);
        *f = f.clone().floor("≥ 50% of raw read + insert", share >= 0.5);
    }

    if let Some(usbpt) = &options.usbpt {
        progress(&format!(
            "idle agent over {:.0} s",
            sizes.idle_window.as_secs_f64()
        ));
        report.extend(idle::agent_idle(main, usbpt, sizes.idle_window).await?);
    }
    Ok(())
}
