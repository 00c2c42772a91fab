//! Claim throughput and conflict rate: `handlers` command handlers, each with its own bus
//! connection, projector and redb view (as separate `usbpt commands` processes have), receive
//! `boots` concurrent boots of a one-device flavor competing for `devices` matching devices.
//! Claims are fenced on their lineage subject, so the stream lets exactly one claim per device
//! win; a handler that loses a race releases, waits for its view and decides again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::oneshot;
use usbpt_bus::{Bus, StreamSettings};
use usbpt_commands::handler::Handler;
use usbpt_commands::schedule::Weigh;
use usbpt_projector::workload::publish_all;
use usbpt_projector::{Projector, ProjectorConfig, View};
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

pub async fn claims(
    target: &Target,
    handlers: usize,
    devices: usize,
    boots: usize,
) -> Result<Vec<Figure>> {
    let bus = target.fresh_bus().await?;
    let seeded = publish_all(&bus, seed(devices)?, 1000).await?;

    let mut sides = Vec::new();
    for k in 0..handlers {
        let dir = tempfile::Builder::new().prefix("usbpt-bench-").tempdir()?;
        let own_bus = Bus::connect(target.url(), None, &StreamSettings::default()).await?;
        let view = Arc::new(View::open(dir.path().join("view.redb"))?);
        let projector = Projector::new(
            own_bus.clone(),
            Arc::clone(&view),
            ProjectorConfig {
                consumer: format!("bench-claims-{k}"),
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

    let started = Instant::now();
    let runs = (0..boots).map(|i| {
        let handler = Arc::clone(&sides[i % sides.len()].handler);
        let flavor = flavor.clone();
        async move {
            let cmd = Command::Boot {
                name: ServerName::new(format!("bench-vm-{i:05}"))?,
                flavor,
                host: None,
            };
            let t = Instant::now();
            let reply = handler
                .execute(&cmd, usbpt_schemas::Origin::policy("bench"))
                .await;
            Ok::<_, anyhow::Error>((t.elapsed(), reply))
        }
    });
    let replies = futures::future::join_all(runs).await;
    let elapsed = started.elapsed();
    let mut lat = Samples::with_capacity(boots);
    let (mut accepted, mut no_device, mut other) = (0usize, 0usize, Vec::new());
    for r in replies {
        let (d, reply) = r?;
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
    use std::sync::atomic::Ordering::Relaxed;
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
    for s in sides {
        let _ = s.stop.send(());
        s.task.await.context("projector task")??;
    }
    if accepted > devices {
        bail!("{accepted} boots accepted for {devices} devices: a device was claimed twice");
    }
    let conflict_rate = 100.0 * conflicts as f64 / decisions.max(1) as f64;
    Ok(vec![Figure::new(
        "claims",
        format!("claims: {handlers} competing handlers, {boots} boots for {devices} devices"),
        boots as u64,
    )
    .rate(accepted as f64 / elapsed.as_secs_f64())
    .latency(lat.summary())
    .value(conflict_rate, "% lost")
    .floor(
        "≥ 2,000 won/s, ≤ 5 % lost, p99 ≤ 50 ms",
        accepted as f64 / elapsed.as_secs_f64() >= 2_000.0
            && conflict_rate <= 5.0
            && lat.summary().1 <= 50_000.0,
    )
    .note(format!(
        "rate = claims won/s; {accepted} won, {no_device} refused (no free device), {} other{}; {conflicts} lost races in {decisions} decisions (value); latency per boot incl. read-your-writes; {breakdown}",
        other.len(),
        other.first().map(|o| format!(" (e.g. {o})")).unwrap_or_default()
    ))])
}
