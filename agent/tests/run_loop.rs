//! The agent loop in-process, fed by the simulated source (the demo's path), with a real
//! nats-server and a real redb file: rescans after a lost-events report, an agent started while
//! the bus is down, and the outbox check that keeps a re-published event out of the stream after
//! the duplicate window.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use tokio::sync::{mpsc, oneshot};
use usbpt_agent::source::{simulated, SimulatedHost};
use usbpt_agent::store::{self, Store};
use usbpt_agent::{AgentConfig, BusTarget, Filter, Interface, Progress, UsbDevice};
use usbpt_bus::{Bus, StartAt, StreamSettings};
use usbpt_schemas::{
    Envelope, Event, HostAgentStarted, HostName, InvalidationReason, PortPath, ProductId,
    UsbAddress, UsbDescriptors, VendorId,
};
use usbpt_testkit::TestNats;

const WAIT: Duration = Duration::from_secs(30);

fn device(port: &str, devnum: u16, serial: &str) -> UsbDevice {
    let port_path: PortPath = port.parse().unwrap();
    let syspath = format!("/sys/devices/sim/usb{}/{port}", port_path.bus());
    let mut desc = UsbDescriptors::new(
        UsbAddress::new(port_path.bus(), devnum).unwrap(),
        port_path,
        VendorId(0x1050),
        ProductId(0x0407),
    );
    desc.serial = Some(serial.into());
    desc.manufacturer = Some("Yubico".into());
    desc.product = Some("YubiKey".into());
    desc.speed = Some("12".into());
    desc.usb_version = Some("2.00".into());
    UsbDevice::new(syspath, desc, vec![Interface::new(0x0b, 0, 0)])
}

struct Running {
    progress: mpsc::UnboundedReceiver<Progress>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), usbpt_agent::AgentError>>,
    host: SimulatedHost,
}

impl Running {
    fn start(dir: &std::path::Path, url: &str, devices: Vec<UsbDevice>) -> Self {
        let (_, host) = simulated(devices);
        Self::start_on(dir, url, host, "boot-1")
    }

    /// An agent for the simulated `host` (a new source for it: the demo's restart path).
    fn start_on(dir: &std::path::Path, url: &str, host: SimulatedHost, boot_id: &str) -> Self {
        let (tx, progress) = mpsc::unbounded_channel();
        let config = AgentConfig {
            host: HostName::new("sim-1").unwrap(),
            boot_id: boot_id.into(),
            hypervisor_uri: "test:///default".into(),
            data_dir: dir.to_owned(),
            filter: Filter::default(),
            bus: BusTarget::new(url),
            progress: Arc::new(move |p: &Progress| {
                let _ = tx.send(p.clone());
            }),
            drain_on_stop: Duration::from_secs(2),
            flap: usbpt_agent::FlapSettings::default(),
        };
        let source = host.source();
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(usbpt_agent::run(config, source, async move {
            let _ = stop_rx.await;
        }));
        Self {
            progress,
            stop: Some(stop_tx),
            task,
            host,
        }
    }

    async fn expect(&mut self, what: &str, check: impl Fn(&Progress) -> bool) -> Result<Progress> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let p = tokio::time::timeout_at(deadline, self.progress.recv())
                .await
                .map_err(|_| anyhow!("no {what} progress within {WAIT:?}"))?
                .ok_or_else(|| anyhow!("the agent stopped before {what}"))?;
            if check(&p) {
                return Ok(p);
            }
        }
    }

    async fn stop(mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(WAIT, self.task).await???;
        Ok(())
    }
}

async fn read_stream(bus: &Bus, n: usize) -> Result<Vec<Envelope>> {
    let mut messages = bus.reader(StartAt::Beginning, None).await?;
    let mut out = Vec::new();
    while out.len() < n {
        let msg = tokio::time::timeout(WAIT, messages.next())
            .await
            .map_err(|_| anyhow!("only {} of {n} events in the stream", out.len()))??;
        out.push(msg.decode()?);
    }
    Ok(out)
}

fn kinds(events: &[Envelope]) -> Vec<&'static str> {
    events.iter().map(|e| e.body.kind()).collect()
}

#[tokio::test]
async fn a_lost_events_report_makes_the_agent_rescan_and_reconcile() -> Result<()> {
    let nats = TestNats::start().await?;
    let dir = tempfile::tempdir()?;
    let a = device("1-1", 5, "AAA");
    let b = device("1-2", 6, "BBB");
    let mut agent = Running::start(dir.path(), &nats.url(), vec![a.clone(), b.clone()]);
    agent
        .expect("drained", |p| matches!(p, Progress::Drained { .. }))
        .await?;

    // While "events were lost": b left, c arrived, a was re-plugged (devnum 5 → 9).
    let c = device("1-3", 7, "CCC");
    let a2 = device("1-1", 9, "AAA");
    let (c2, a3) = (c.clone(), a2.clone());
    agent.host.change_silently_then_lose(move |present| {
        present.remove(&b.syspath);
        present.insert(c2.syspath.clone(), c2);
        present.insert(a3.syspath.clone(), a3);
    });
    let p = agent
        .expect("rescanned", |p| matches!(p, Progress::Rescanned { .. }))
        .await?;
    assert!(matches!(p, Progress::Rescanned { events: 4, .. }), "{p:?}");
    agent
        .expect("drained", |p| matches!(p, Progress::Drained { .. }))
        .await?;

    let bus = nats.bus().await?;
    let events = read_stream(&bus, 7).await?;
    assert_eq!(
        kinds(&events[3..]),
        [
            "DeviceInvalidated",
            "DeviceInvalidated",
            "DeviceDiscovered",
            "DeviceDiscovered"
        ]
    );
    for e in &events[3..5] {
        let Event::DeviceInvalidated(i) = &e.body else {
            bail!("not invalidated")
        };
        assert_eq!(
            i.reason,
            InvalidationReason::Unplugged,
            "lost while watching, not while down"
        );
    }
    let re = events[5..]
        .iter()
        .find_map(|e| match &e.body {
            Event::DeviceDiscovered(d) if d.descriptors.address == a2.descriptors.address => {
                Some(d.clone())
            }
            _ => None,
        })
        .expect("a rediscovered");
    assert!(re.supersedes.is_some());
    agent.stop().await
}

#[tokio::test]
async fn an_agent_started_while_the_bus_is_down_watches_and_publishes_when_it_comes() -> Result<()>
{
    let mut nats = TestNats::start().await?;
    let url = nats.url();
    nats.stop().await?;
    let dir = tempfile::tempdir()?;
    let mut agent = Running::start(dir.path(), &url, vec![device("1-1", 5, "AAA")]);
    let ready = agent
        .expect("ready", |p| matches!(p, Progress::Ready { .. }))
        .await?;
    assert!(
        matches!(
            ready,
            Progress::Ready {
                candidates: 1,
                outbox: 2,
                ..
            }
        ),
        "{ready:?}"
    );
    agent.host.plug(device("1-2", 6, "BBB"));
    agent.host.unplug("/sys/devices/sim/usb1/1-1");
    agent
        .expect("queued", |p| {
            matches!(p, Progress::Queued { outbox: 4, .. })
        })
        .await?;
    nats.restart().await?;
    agent
        .expect("drained", |p| {
            matches!(p, Progress::Drained { published: 4 })
        })
        .await?;
    let bus = nats.bus().await?;
    let events = read_stream(&bus, 4).await?;
    assert_eq!(
        kinds(&events),
        [
            "DeviceDiscovered",
            "HostAgentStarted",
            "DeviceDiscovered",
            "DeviceInvalidated"
        ]
    );
    assert_eq!(bus.last_sequence().await?, 4);
    agent.stop().await
}

#[tokio::test]
async fn an_event_stored_before_a_crash_is_not_published_again_after_the_duplicate_window(
) -> Result<()> {
    let nats = TestNats::start().await?;
    // A stream that forgets message ids after 100 ms, so only the agent's own check can keep a
    // second copy out.
    let window = Duration::from_millis(100);
    let settings = StreamSettings {
        duplicate_window: window,
        ..StreamSettings::default()
    };
    let bus = Bus::connect(&nats.url(), None, &settings).await?;
    let dir = tempfile::tempdir()?;
    let host = HostName::new("sim-1")?;

    // An earlier run queued an event, published it, and died before removing it.
    let stored = Envelope::new(Event::HostAgentStarted(HostAgentStarted {
        host: host.clone(),
        boot_id: "boot-0".into(),
        agent_version: "0".into(),
        hypervisor_uri: "test:///default".into(),
    }));
    {
        let (store, state) = Store::open(&dir.path().join(store::file_name(&host)))?;
        store.commit(&state, &state, std::slice::from_ref(&stored))?;
    }
    bus.publish(&stored).await?;
    // A timed wait on purpose: the server's duplicate window has to lapse; nothing signals it.
    // The probe shows it did: published again, it is stored a second time.
    let probe = Envelope::new(Event::DeviceClashDetected(
        usbpt_schemas::DeviceClashDetected {
            host: host.clone(),
            vendor_id: VendorId(1),
            product_id: ProductId(1),
            serial: "probe".into(),
            port_paths: vec![],
        },
    ));
    bus.publish(&probe).await?;
    tokio::time::sleep(window * 3).await;
    assert!(
        !bus.publish(&probe).await?.duplicate,
        "the duplicate window has lapsed"
    );

    let mut agent = Running::start(dir.path(), &nats.url(), vec![]);
    agent
        .expect("drained", |p| matches!(p, Progress::Drained { .. }))
        .await?;
    let events = read_stream(&bus, 4).await?;
    assert_eq!(
        kinds(&events),
        [
            "HostAgentStarted",
            "DeviceClashDetected",
            "DeviceClashDetected",
            "HostAgentStarted"
        ]
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e.event_id == stored.event_id)
            .count(),
        1
    );
    assert_eq!(
        bus.last_sequence().await?,
        4,
        "the stored event once, then the new start"
    );
    agent.stop().await
}

#[tokio::test]
async fn a_simulated_host_rebooted_between_two_agents_links_its_enumerations() -> Result<()> {
    let nats = TestNats::start().await?;
    let dir = tempfile::tempdir()?;
    let (_, host) = simulated(vec![device("1-1", 5, "AAA"), device("1-2", 6, "BBB")]);
    let mut agent = Running::start_on(dir.path(), &nats.url(), host.clone(), "boot-1");
    agent
        .expect("drained", |p| matches!(p, Progress::Drained { .. }))
        .await?;
    agent.stop().await?;

    // Plugged while no agent runs: nobody hears it. Then the host reboots and renumbers.
    host.plug(device("1-3", 7, "CCC"));
    host.change_silently(|present| {
        present.clear();
        for d in [
            device("1-1", 2, "AAA"),
            device("1-2", 3, "BBB"),
            device("1-3", 4, "CCC"),
        ] {
            present.insert(d.syspath.clone(), d);
        }
    });
    let mut agent = Running::start_on(dir.path(), &nats.url(), host.clone(), "boot-2");
    agent
        .expect("drained", |p| matches!(p, Progress::Drained { .. }))
        .await?;
    let bus = nats.bus().await?;
    let events = read_stream(&bus, 9).await?;
    assert_eq!(
        kinds(&events[3..]),
        [
            "DeviceInvalidated",
            "DeviceInvalidated",
            "DeviceDiscovered",
            "DeviceDiscovered",
            "DeviceDiscovered",
            "HostAgentStarted"
        ]
    );
    let linked = events[3..]
        .iter()
        .filter(|e| matches!(&e.body, Event::DeviceDiscovered(d) if d.supersedes.is_some()))
        .count();
    assert_eq!(
        linked, 2,
        "AAA and BBB follow their serial lineages; CCC is new"
    );
    assert_eq!(bus.last_sequence().await?, 9);
    assert_eq!(host.present().len(), 3);
    agent.stop().await
}
