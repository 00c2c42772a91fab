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
//! the operator's server (`--nats`). [`Options::only`] restricts a run to some [`Section`]s.

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

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

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
    /// The sections to measure (`usbpt bench --only`); empty: every section.
    pub only: Vec<Section>,
    /// Events of the synthetic history the fold section folds and replays (`usbpt bench
    /// --fold-events`); `None`: the mode's size ([`Sizes::fold_events`]).
    pub fold_events: Option<usize>,
}

impl Options {
    /// Whether `section` is measured in this run.
    pub fn runs(&self, section: Section) -> bool {
        self.only.is_empty() || self.only.contains(&section)
    }

    /// The sections this run measures, in the order they run (every one unless `only` names
    /// some).
    pub fn sections(&self) -> Vec<Section> {
        Section::ALL.into_iter().filter(|s| self.runs(*s)).collect()
    }

    /// Whether this run measures every section (no `--only`, or one naming them all).
    pub fn is_complete(&self) -> bool {
        Section::ALL.into_iter().all(|s| self.runs(s))
    }
}

/// A part of the suite, selectable with `usbpt bench --only`, in the order [`run`] measures
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Section {
    /// The codec and envelope sizes.
    Codec,
    /// The agent's publish and the raw JetStream publishes, on each server.
    Publish,
    /// Hotplug → view, the query path and the raw hotplug path, on each server.
    Hotplug,
    /// Claims with competing command handlers and the raw fenced publish (first server only).
    Claims,
    /// Scheduling over a synthetic view.
    Sched,
    /// The projector's fold and full replay against raw read + insert.
    Fold,
    /// An idle agent's CPU and memory.
    Idle,
}

impl Section {
    /// Every section, in the order they run.
    pub const ALL: [Section; 7] = [
        Section::Codec,
        Section::Publish,
        Section::Hotplug,
        Section::Claims,
        Section::Sched,
        Section::Fold,
        Section::Idle,
    ];

    /// The name `--only` takes and the report shows.
    pub fn name(self) -> &'static str {
        match self {
            Section::Codec => "codec",
            Section::Publish => "publish",
            Section::Hotplug => "hotplug",
            Section::Claims => "claims",
            Section::Sched => "sched",
            Section::Fold => "fold",
            Section::Idle => "idle",
        }
    }

    /// What the section measures, for `--help`.
    pub fn about(self) -> &'static str {
        match self {
            Section::Codec => "codec speed and envelope sizes",
            Section::Publish => "agent publish and raw JetStream publish (each server)",
            Section::Hotplug => "hotplug → view, queries and the raw hotplug path (each server)",
            Section::Claims => "claims and the raw fenced publish (first server)",
            Section::Sched => "scheduling latency",
            Section::Fold => "projector fold and full replay",
            Section::Idle => "an idle agent's CPU and memory",
        }
    }
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is no [`Section`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownSection(pub String);

impl fmt::Display for UnknownSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = Section::ALL.iter().map(|s| s.name()).collect();
        write!(
            f,
            "unknown bench section '{}' (valid: {})",
            self.0,
            names.join(", ")
        )
    }
}

impl std::error::Error for UnknownSection {}

impl FromStr for Section {
    type Err = UnknownSection;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Section::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| UnknownSection(s.to_owned()))
    }
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
    /// Boots one after the other through one handler (`boot_uncontended`).
    pub boot_uncontended: usize,
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
            claim_devices: 1_000,
            claim_boots: 2_000,
            boot_uncontended: 500,
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
            boot_uncontended: 10,
            sched_hosts: 200,
            sched_min: 20,
            sched_budget: Duration::from_millis(500),
            fold_events: 5_000,
            idle_window: Duration::from_secs(2),
        }
    }
}

/// Runs every measurement of the selected sections ([`Options::only`]) and returns the report.
/// `progress` hears what is being measured.
pub async fn run(options: &Options, mut progress: impl FnMut(&str)) -> Result<Report> {
    let started = Instant::now();
    let mut sizes = if options.quick {
        Sizes::quick()
    } else {
        Sizes::full()
    };
    if let Some(n) = options.fold_events {
        sizes.fold_events = n;
    }
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

/// The encoded size of one `DeviceDiscovered` as [`publish::agent_publish`] queues it: the
/// payload of the raw figures when the publish section is not run.
fn event_size() -> Result<usize> {
    let host = usbpt_schemas::HostName::new("bench-publisher")?;
    Ok(usbpt_schemas::codec::encode(&codec::sample_discovered_on(host))?.len())
}

async fn measure(
    report: &mut Report,
    targets: &[Target],
    sizes: &Sizes,
    options: &Options,
    progress: &mut impl FnMut(&str),
) -> Result<()> {
    if options.runs(Section::Codec) {
        progress("codec and envelope sizes");
        report.extend(codec::figures(sizes.codec_iterations)?);
    }

    let per_target = [Section::Publish, Section::Hotplug, Section::Claims];
    if per_target.into_iter().any(|s| options.runs(s)) {
        let mut size = event_size()?;
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

            if options.runs(Section::Publish) {
                progress(&format!(
                    "agent publish ({}; {})",
                    n(sizes.agent_publish),
                    t.label
                ));
                let (agent, published) = publish::agent_publish(t, n(sizes.agent_publish)).await?;
                size = published;
                report.push(tag(agent));
                progress(&format!("raw JetStream publish ({})", t.label));
                report.push(tag(raw::publish_each_ack(
                    t.url(),
                    n(sizes.raw_publish),
                    size,
                )
                .await?));
                // With an fsync per message, 1,000 in flight is no faster than a tenth of the
                // count.
                let inflight = if t.suffix.is_empty() {
                    sizes.raw_inflight
                } else {
                    n(sizes.raw_inflight / 10)
                };
                report.push(tag(raw::publish_async(t.url(), inflight, size, 1000).await?));
                report.compare_rate(&key("agent_publish"), &key("raw_publish_inflight"));
            }

            if options.runs(Section::Hotplug) {
                progress(&format!(
                    "hotplug → view ({} events; {})",
                    n(sizes.hotplug),
                    t.label
                ));
                let h = hotplug::hotplug_to_view(
                    t,
                    n(sizes.hotplug),
                    i == 0,
                    usbpt_projector::ViewSync::EachCommit,
                )
                .await?;
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
                    // The operator's trade-off (ADR 0015): the view's fsync off the path.
                    let lazy = usbpt_projector::ViewSync::Within(hotplug::LAZY_VIEW_SYNC);
                    progress(&format!(
                        "hotplug → view, the view durable within {} ms ({} events; {})",
                        hotplug::LAZY_VIEW_SYNC.as_millis(),
                        n(sizes.hotplug),
                        t.label
                    ));
                    let h = hotplug::hotplug_to_view(t, n(sizes.hotplug), false, lazy).await?;
                    let lazy_key = h.figures.first().map(|f| f.key.clone());
                    report.extend(h.figures);
                    if let Some(k) = lazy_key {
                        report.compare_latency(&k, "raw_hotplug_path");
                    }
                    report.compare_latency("api_get_device", "view_device_lookup");
                }
            }

            if i == 0 && options.runs(Section::Claims) {
                use claims::ClaimLoad;
                let window = usbpt_commands::handler::IN_FLIGHT;
                progress(&format!(
                    "claims: one boot at a time ({} boots), then 4 handlers × {window} callers, {} boots for {} devices; each with durable and lazy views",
                    sizes.boot_uncontended, sizes.claim_boots, sizes.claim_devices
                ));
                // One boot at a time through one handler, then 4 handlers × the window; each with
                // views durable at every commit and within 100 ms (ADR 0015).
                let loads = [
                    (1, 1, sizes.boot_uncontended, sizes.boot_uncontended),
                    (4, window, sizes.claim_devices, sizes.claim_boots),
                ];
                for (handlers, clients, devices, boots) in loads {
                    for view_sync in [
                        usbpt_projector::ViewSync::EachCommit,
                        usbpt_projector::ViewSync::from_millis(100),
                    ] {
                        let load = ClaimLoad {
                            handlers,
                            clients,
                            devices,
                            boots,
                            view_sync,
                        };
                        report.extend(claims::claims(t, load).await?);
                    }
                }
                report.push(raw::fenced_publish(t.url(), sizes.raw_fenced, size).await?);
                report.compare_rate("claims", "raw_fenced_publish");
                report.compare_rate("claims.view_sync_100ms", "raw_fenced_publish");
            }
        }
    }

    if options.runs(Section::Sched) {
        progress(&format!(
            "scheduling over {} hosts × 16 devices",
            sizes.sched_hosts
        ));
        let (hosts, min, budget) = (sizes.sched_hosts, sizes.sched_min, sizes.sched_budget);
        let figures =
            tokio::task::spawn_blocking(move || sched::scheduling(hosts, 16, min, budget))
                .await??;
        report.extend(figures);
        report.compare_latency("schedule_decide", "raw_index_scan");
        report.compare_latency("schedule_query", "raw_index_scan");
    }

    let main = &targets[0];
    if options.runs(Section::Fold) {
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
            *f = f.clone().floor("≥ 70% of raw read + insert", share >= 0.7);
        }
        if let Some(f) = report.figures.iter_mut().find(|f| f.key == "replay") {
            let rate = f.rate_per_s.unwrap_or(0.0);
            *f = f.clone().floor("≥ 250,000/s", rate >= 250_000.0);
        }
    }

    if options.runs(Section::Idle) {
        if let Some(usbpt) = &options.usbpt {
            progress(&format!(
                "idle agent over {:.0} s",
                sizes.idle_window.as_secs_f64()
            ));
            report.extend(idle::agent_idle(main, usbpt, sizes.idle_window).await?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_parse_by_name_and_default_to_all() {
        for s in Section::ALL {
            assert_eq!(s.name().parse::<Section>(), Ok(s));
        }
        let err = "nonsense".parse::<Section>().map(|_| ()).unwrap_err();
        assert!(err.to_string().contains("codec, publish, hotplug"), "{err}");

        let all = Options::default();
        assert!(all.is_complete());
        assert_eq!(all.sections(), Section::ALL.to_vec());
        let some = Options {
            only: vec![Section::Fold, Section::Codec, Section::Fold],
            ..Options::default()
        };
        assert!(!some.is_complete());
        assert!(!some.runs(Section::Hotplug));
        assert_eq!(some.sections(), vec![Section::Codec, Section::Fold]);
    }
}
