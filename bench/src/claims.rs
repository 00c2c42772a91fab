//! Claim throughput and conflict rate: `handlers` command handlers, each with its own bus
//! connection, projector and redb view (as separate `usbpt commands` processes have), receive
//! `boots` boots of a one-device flavor competing for `devices` matching devices. Claims are
//! fenced on their lineage subject, so the stream lets exactly one claim per device win; a
//! handler that loses a race decides again on a fresher view.
//!
//! The load is a closed loop: each handler has `clients` callers, each sending its next boot
//! when the last one is answered (as the API's and the CLI's callers do), so a boot's latency
//! is its service time at that concurrency, not its place in a queue of every boot at once.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::oneshot;
use usbpt_bus::{Bus, StreamSettings};
use usbpt_commands::handler::Handler;
use usbpt_commands::schedule::Weigh;
use usbpt_projector::workload::publish_all;
use usbpt_projector::{Projector, ProjectorConfig, View, ViewSync};
use usbpt_schemas::commands::{Command, CommandReply, RejectKind};
use usbpt_schemas::*;

use crate::report::Figure;
use crate::stats::Samples;
use crate::target::Target;

const PER_HOST: usize = 4;

/// `HostAgentStarted` per host and one `DeviceDiscovered` per device (serial lineages), as
/// agents would publish them.
fn seed(devices: usize) -> Result<Vec<Envelope>> {
    let mut out = Vec::new();
    let hosts = devices.div_ceil(PER_HOST);
    for h in 0..hosts {
        let host = HostName::new(format!("claim-host-{h:04}"))?;
        out.push(Envelope::new(Event::HostAgentStarted(HostAgentStarted {
            host: host.clone(),
            boot_id: "boot-1".into(),
            agent_version: "bench".into(),
            hypervisor_uri: "test:///default".into(),
        })));
        for d in 0..PER_HOST.min(devices - h * PER_HOST) {
            let serial = format!("KEY-{h:04}-{d}");
            let vendor = VendorId(0x136b);
            let product = ProductId(0x0003);
            out.push(Envelope::new(Event::DeviceDiscovered(DeviceDiscovered {
                device_id: DeviceId::new_v7(),
                lineage_id: LineageId::derive(&LineageKey::Serial {
                    vendor,
                    product,
                    serial: &serial,
                }),
                lineage_kind: LineageKind::Serial,
                host: host.clone(),
                boot_id: "boot-1".into(),
                descriptors: UsbDescriptors {
                    address: UsbAddress::new(1, u16::try_from(d + 2)?)?,
                    port_path: format!("1-{}", d + 1).parse()?,
                    vendor_id: vendor,
                    product_id: product,
                    serial: Some(serial),
                    device_class: 0,
                    interface_classes: vec![0x0b],
                    manufacturer: None,
                    product: Some("Licence key".into()),
                    vendor_db: None,
                    model_db: None,
                    speed: Some("12".into()),
                    usb_version: Some("2.00".into()),
                },
                syspath: format!("/sys/devices/bench/usb1/1-{}", d + 1),
                supersedes: None,
            })));
        }
    }
    Ok(out)
}

struct Side {
    handler: Arc<Handler<View>>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), usbpt_projector::ProjectorError>>,
    _dir: tempfile::TempDir,
}

/// How the claims are measured.
#[derive(Debug, Clone, Copy)]
pub struct ClaimLoad {
    pub handlers: usize,
    /// Callers per handler, each with one boot outstanding.
    pub clients: usize,
    pub devices: usize,
    pub boots: usize,
    /// How the handlers' views commit (ADR 0015).
    pub view_sync: ViewSync,
}

pub async fn claims(target: &Target, load: ClaimLoad) -> Result<Vec<Figure>> {
    let ClaimLoad {
        handlers,
        clients,
        devices,
        boots,
        view_sync,
    } = load;
    let bus = target.fresh_bus().await?;
    let seeded = publish_all(&bus, seed(devices)?, 1000).await?;

    let mut sides = Vec::new();
    for k in 0..handlers {
        let dir = tempfile::Builder::new().prefix("usbpt-bench-").tempdir()?;
        let own_bus = Bus::connect(target.url(), None, &StreamSettings::default()).await?;
        let view = Arc::new(View::open_for(dir.path().join("view.redb"), view_sync)?);
        let projector = Projector::new(
            own_bus.clone(),
            Arc::clone(&view),
            ProjectorConfig {
                consumer: format!("bench-claims-{k}"),
                view_sync,
                ..ProjectorConfig::default()
            },
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(projector.run(async move {
            let _ = stopped.await;
        }));
        if !view.wait_applied(seeded, Duration::from_secs(60)).await {
            bail!("handler {k}'s view did not fold the {seeded} seeded events within 60 s");
        }
        let handler = Arc::new(Handler::new(own_bus, view, Weigh::Pack));
        sides.push(Side {
            handler,
            stop,
            task,
            _dir: dir,
        });
    }
    let flavor = FlavorName::new("bench-key")?;
    let reply = sides[0]
        .handler
        .execute(
            &Command::CreateFlavor {
                resources: Default::default(),
                name: flavor.clone(),
                usb: vec!["vendor=136b,product=0003,controller=xhci".parse()?],
                on_fingerprint_change: None,
            },
            usbpt_schemas::Origin::policy("bench"),
        )
        .await;
    if !matches!(reply, CommandReply::Accepted { .. }) {
        bail!("creating the bench flavor: {reply:?}");
    }

    let cpu_before = usbpt_projector::metrics::process_cpu_seconds();
    let server_before = target.server_cpu_seconds();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let callers = (0..handlers * clients).map(|c| {
        let handler = Arc::clone(&sides[c % sides.len()].handler);
        let flavor = flavor.clone();
        let next = Arc::clone(&next);
        async move {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Relaxed);
                if i >= boots {
                    return Ok::<_, anyhow::Error>(done);
                }
                let cmd = Command::Boot {
                    name: ServerName::new(format!("bench-vm-{i:05}"))?,
                    flavor: flavor.clone(),
                    host: None,
                };
                let t = Instant::now();
                let reply = handler
                    .execute(&cmd, usbpt_schemas::Origin::policy("bench"))
                    .await;
                done.push((t.elapsed(), reply));
            }
        }
    });
    let replies = futures::future::try_join_all(callers).await?;
    let elapsed = started.elapsed();
    let cpu = usbpt_projector::metrics::process_cpu_seconds() - cpu_before;
    let server_cpu = target
        .server_cpu_seconds()
        .zip(server_before)
        .map(|(after, before)| after - before);
    let mut lat = Samples::with_capacity(boots);
    let (mut accepted, mut no_device, mut other) = (0usize, 0usize, Vec::new());
    for (d, reply) in replies.into_iter().flatten() {
        lat.push(d);
        match reply {
            CommandReply::Accepted { .. } => accepted += 1,
            CommandReply::Rejected {
                kind: RejectKind::Conflict,
                reason,
            } if reason.contains("no host") => no_device += 1,
            CommandReply::Rejected { kind, reason } => other.push(format!("{kind}: {reason}")),
        }
    }
    let stat = |f: fn(&usbpt_commands::handler::HandlerStats) -> u64| -> u64 {
        sides.iter().map(|s| f(s.handler.stats())).sum()
    };
    let decisions = stat(|s| s.decisions.load(Relaxed));
    let conflicts = stat(|s| s.conflicts.load(Relaxed));
    let commands = stat(|s| s.commands.load(Relaxed)).max(1) as f64;
    let ms = |us: u64| us as f64 / commands / 1000.0;
    let breakdown = format!(
        "mean per boot: queue {:.1} ms, view to head {:.1} ms, decide {:.2} ms, append {:.2} ms, read-your-writes {:.1} ms, lost races {:.1} ms",
        ms(stat(|s| s.queue_us.load(Relaxed))),
        ms(stat(|s| s.head_us.load(Relaxed))),
        ms(stat(|s| s.decide_us.load(Relaxed))),
        ms(stat(|s| s.append_us.load(Relaxed))),
        ms(stat(|s| s.view_us.load(Relaxed))),
        ms(stat(|s| s.retry_us.load(Relaxed))),
    );
    let per_boot = |secs: f64| secs * 1e6 / boots as f64;
    let cpu_note = format!(
        "CPU per boot: handlers and projectors {:.0} µs{}",
        per_boot(cpu),
        server_cpu
            .map(|s| format!(", nats-server {:.0} µs", per_boot(s)))
            .unwrap_or_default()
    );
    for s in sides {
        let _ = s.stop.send(());
        s.task.await.context("projector task")??;
    }
    if accepted > devices {
        bail!("{accepted} boots accepted for {devices} devices: a device was claimed twice");
    }
    let conflict_rate = 100.0 * conflicts as f64 / decisions.max(1) as f64;
    let won_per_s = accepted as f64 / elapsed.as_secs_f64();
    let (p50, p99, _) = lat.summary();
    let sync = match view_sync {
        ViewSync::EachCommit => "views durable each commit".to_owned(),
        ViewSync::Within(d) => format!("views durable within {} ms", d.as_millis()),
    };
    let suffix = match view_sync {
        ViewSync::EachCommit => String::new(),
        ViewSync::Within(d) => format!(".view_sync_{}ms", d.as_millis()),
    };
    let figure = if handlers == 1 && clients == 1 {
        Figure::new(
            format!("boot_uncontended{suffix}"),
            format!("boot, uncontended: one caller, one handler, {sync}"),
            boots as u64,
        )
        .rate(boots as f64 / elapsed.as_secs_f64())
        .latency(lat.summary())
        .floor("p50 ≤ 2 ms, p99 ≤ 5 ms", p50 <= 2_000.0 && p99 <= 5_000.0)
    } else {
        Figure::new(
            format!("claims{suffix}"),
            format!("claims: {handlers} handlers × {clients} callers, {sync}"),
            boots as u64,
        )
        .rate(won_per_s)
        .latency(lat.summary())
        .value(conflict_rate, "% lost")
        .floor(
            "≥ 2,000 won/s, ≤ 5 % lost, p99 ≤ 50 ms",
            won_per_s >= 2_000.0 && conflict_rate <= 5.0 && p99 <= 50_000.0,
        )
    };
    Ok(vec![figure.note(format!(
        "{boots} boots for {devices} devices; rate = claims won/s; {accepted} won, {no_device} refused (no free device), {} other{}; {conflicts} lost races in {decisions} decisions (value); latency per boot incl. read-your-writes; {breakdown}; {cpu_note}",
        other.len(),
        other.first().map(|o| format!(" (e.g. {o})")).unwrap_or_default()
    ))])
}
