//! 200 concurrent boots from 4 `usbpt commands` processes competing for 50 matching devices:
//! exactly 50 servers are scheduled, and the stream itself shows no device ever claimed twice.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command as Proc};
use usbpt_bus::{Bus, StartAt};
use usbpt_commands::handler::request;
use usbpt_schemas::commands::{Command, CommandReply, RejectKind};
use usbpt_schemas::*;
use usbpt_testkit::TestNats;

/// Publishes `HostAgentStarted` and one `DeviceDiscovered` per device, as agents would.
pub async fn seed_devices(bus: &Bus, hosts: usize, per_host: usize) -> Result<()> {
    for h in 0..hosts {
        let host = HostName::new(format!("host-{h:02}"))?;
        bus.publish(&Envelope::new(Event::HostAgentStarted(HostAgentStarted {
            host: host.clone(),
            boot_id: "boot-1".into(),
            agent_version: "test".into(),
            hypervisor_uri: "test:///default".into(),
        })))
        .await?;
        for d in 0..per_host {
            let serial = format!("KEY-{h:02}-{d}");
            let vendor = VendorId(0x136b);
            let product = ProductId(0x0003);
            let port: PortPath = format!("1-{}", d + 1).parse()?;
            bus.publish(&Envelope::new(Event::DeviceDiscovered(DeviceDiscovered {
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
                    port_path: port,
                    vendor_id: vendor,
                    product_id: product,
                    serial: Some(serial),
                    device_class: 0,
                    interface_classes: vec![3],
                    manufacturer: None,
                    product: Some("Licence key".into()),
                    vendor_db: None,
                    model_db: None,
                    speed: Some("12".into()),
                    usb_version: Some("2.00".into()),
                },
                syspath: format!("/sys/devices/test/usb1/1-{}", d + 1),
                supersedes: None,
            })))
            .await?;
        }
    }
    Ok(())
}

/// Starts `usbpt commands` and returns once it says it is ready.
async fn start_handler(nats: &str, data: &std::path::Path, i: usize) -> Result<Child> {
    let mut child = Proc::new(env!("CARGO_BIN_EXE_usbpt"))
        .env("USBPT_INSECURE", "1")
        .args(["commands", "--consumer", &format!("handler-{i}")])
        .env("NATS_URL", nats)
        .env("USBPT_DATA_DIR", data)
        .env("USBPT_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawn usbpt commands")?;
    let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            eprintln!("[commands-{i}] {line}");
            if line.contains("usbpt commands: ready") {
                return Ok(());
            }
        }
        bail!("usbpt commands {i} exited before it was ready")
    })
    .await??;
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[commands-{i}] {line}");
        }
    });
    Ok(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_boots_four_handlers_fifty_devices() -> Result<()> {
    let nats = TestNats::start().await?;
    let bus = nats.bus().await?;
    seed_devices(&bus, 10, 5).await?;
    let dirs: Vec<_> = (0..4)
        .map(|_| tempfile::tempdir())
        .collect::<Result<_, _>>()?;
    let mut handlers = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        handlers.push(start_handler(&nats.url(), d.path(), i).await?);
    }
    let client = bus.clone();
    let reply = request(
        &client,
        &Command::CreateFlavor {
            resources: Default::default(),
            name: FlavorName::new("key")?,
            usb: vec!["vendor=136b,product=0003,controller=xhci".parse()?],
            on_fingerprint_change: None,
        },
        Duration::from_secs(30),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    assert!(matches!(reply, CommandReply::Accepted { .. }), "{reply:?}");

    let boots = (0..200).map(|i| {
        let client = client.clone();
        async move {
            let cmd = Command::Boot {
                name: ServerName::new(format!("erp-{i:03}")).unwrap(),
                flavor: FlavorName::new("key").unwrap(),
                host: None,
            };
            request(&client, &cmd, Duration::from_secs(120)).await
        }
    });
    let replies = futures::future::join_all(boots).await;
    let mut accepted = 0;
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for r in &replies {
        if let Ok(CommandReply::Rejected { reason, .. }) = r {
            *reasons
                .entry(reason.chars().take(60).collect())
                .or_default() += 1;
        }
    }
    eprintln!("rejections: {reasons:#?}");
    for r in &replies {
        match r.as_ref().map_err(|e| anyhow::anyhow!("{e}"))? {
            CommandReply::Accepted { .. } => accepted += 1,
            CommandReply::Rejected { kind, reason } => {
                assert_eq!(*kind, RejectKind::Conflict, "{reason}");
                assert!(!reason.is_empty());
            }
        }
    }
    assert_eq!(accepted, 50, "exactly one server per device");

    // The stream itself: replay claims in order; a lineage is never claimed while held.
    let last = bus.last_sequence().await?;
    let mut events = bus.reader(StartAt::Beginning, None).await?;
    let mut held: BTreeMap<LineageId, ServerId> = BTreeMap::new();
    let mut scheduled = BTreeSet::new();
    let mut seen = 0;
    while seen < last {
        let msg = events.next().await?;
        seen = msg.seq;
        match msg.decode()?.body {
            Event::DeviceClaimed(c) => {
                if let Some(other) = held.insert(c.lineage_id, c.server_id) {
                    panic!(
                        "lineage {} claimed by {} while held by {other}",
                        c.lineage_id, c.server_id
                    );
                }
            }
            Event::DeviceReleased(r) => {
                assert_eq!(
                    held.remove(&r.lineage_id),
                    Some(r.server_id),
                    "release of a claim not held"
                );
            }
            Event::ServerScheduled(s) => assert!(scheduled.insert(s.server_id), "scheduled twice"),
            _ => {}
        }
    }
    assert_eq!(held.len(), 50);
    assert_eq!(scheduled.len(), 50);
    let holders: BTreeSet<_> = held.values().collect();
    assert_eq!(holders.len(), 50, "one device per server");
    drop(handlers);
    Ok(())
}

/// A command handler with its own bus connection, projector and redb view, as a separate
/// `usbpt commands` process has: two of them share nothing but the stream.
struct OwnHandler {
    handler: std::sync::Arc<usbpt_commands::handler::Handler<usbpt_projector::View>>,
    view: std::sync::Arc<usbpt_projector::View>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), usbpt_projector::ProjectorError>>,
    _dir: tempfile::TempDir,
}

async fn own_handler(nats: &TestNats, k: usize, seen: u64) -> Result<OwnHandler> {
    use usbpt_projector::{Projector, ProjectorConfig, View};
    let dir = tempfile::tempdir()?;
    let bus = nats.bus().await?;
    let view = std::sync::Arc::new(View::open(dir.path().join("view.redb"))?);
    let projector = Projector::new(
        bus.clone(),
        std::sync::Arc::clone(&view),
        ProjectorConfig {
            consumer: format!("names-{k}"),
            ..ProjectorConfig::default()
        },
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(projector.run(async move {
        let _ = stopped.await;
    }));
    assert!(view.wait_applied(seen, Duration::from_secs(30)).await);
    let handler = std::sync::Arc::new(usbpt_commands::handler::Handler::new(
        bus,
        std::sync::Arc::clone(&view),
        usbpt_commands::schedule::Weigh::Pack,
    ));
    Ok(OwnHandler {
        handler,
        view,
        stop,
        task,
        _dir: dir,
    })
}

/// ADR 0003's known limit, closed (ADR 0010): boots of one name from four handlers, each with its
/// own connection and view, at the same instant, 40 names over: exactly one boot per name wins,
/// the others are told the name is in use, and the stream holds one boot request per name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_boots_of_one_name_in_four_handlers_one_wins() -> Result<()> {
    const NAMES: usize = 40;
    let nats = TestNats::start().await?;
    let bus = nats.bus().await?;
    seed_devices(&bus, 2, 0).await?;
    let mut sides = Vec::new();
    for k in 0..4 {
        sides.push(own_handler(&nats, k, bus.last_sequence().await?).await?);
    }
    let flavor = FlavorName::new("plain")?;
    let reply = sides[0]
        .handler
        .execute(
            &Command::CreateFlavor {
                resources: Default::default(),
                name: flavor.clone(),
                usb: Vec::new(),
                on_fingerprint_change: None,
            },
            usbpt_schemas::Origin::policy("test"),
        )
        .await;
    assert!(matches!(reply, CommandReply::Accepted { .. }), "{reply:?}");
    let head = bus.last_sequence().await?;
    for s in &sides {
        assert!(s.handler_view_at(head).await);
    }

    for i in 0..NAMES {
        let name = ServerName::new(format!("vm-{i:02}"))?;
        let boots = sides.iter().map(|s| {
            let cmd = Command::Boot {
                name: name.clone(),
                flavor: flavor.clone(),
                host: None,
            };
            let handler = std::sync::Arc::clone(&s.handler);
            async move {
                handler
                    .execute(&cmd, usbpt_schemas::Origin::policy("test"))
                    .await
            }
        });
        let replies = futures::future::join_all(boots).await;
        let mut accepted = 0;
        for r in &replies {
            match r {
                CommandReply::Accepted { .. } => accepted += 1,
                CommandReply::Rejected { kind, reason } => {
                    assert_eq!(*kind, RejectKind::Conflict, "{reason}");
                    assert!(reason.contains("in use"), "{reason}");
                }
            }
        }
        assert_eq!(accepted, 1, "{name}: {replies:?}");
    }

    // The stream: one boot request per name, and no compensating deletions were needed.
    let last = bus.last_sequence().await?;
    let mut events = bus.reader(StartAt::Beginning, None).await?;
    let mut requested: BTreeMap<ServerName, usize> = BTreeMap::new();
    let mut seen = 0;
    while seen < last {
        let msg = events.next().await?;
        seen = msg.seq;
        match msg.decode()?.body {
            Event::ServerBootRequested(b) => {
                assert_eq!(msg.subject, subjects::name(&b.name));
                *requested.entry(b.name).or_default() += 1;
            }
            Event::ServerDeleted(d) => panic!("a boot was undone: {d:?}"),
            _ => {}
        }
    }
    assert_eq!(requested.len(), NAMES);
    assert!(requested.values().all(|n| *n == 1), "{requested:?}");
    for s in sides {
        let _ = s.stop.send(());
        s.task.await??;
    }
    Ok(())
}

impl OwnHandler {
    /// Whether this handler's view has applied `seq` (within 30 s).
    async fn handler_view_at(&self, seq: u64) -> bool {
        self.view.wait_applied(seq, Duration::from_secs(30)).await
    }
}
